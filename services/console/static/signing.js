// pilothouse console: your decisions are signed HERE, in your browser, with your own Ed25519 key (WebCrypto).
// The console server only hands out the exact statement to sign and forwards your signature; it never sees your
// private key, so it cannot approve, validate or release a kill switch in your name (policy checks the signature
// against the registry of enrolled keys). Your key file (PKCS#8 PEM; the local stack's: .stack/humans/<id>.key) is
// imported once as a NON-extractable key and kept in this browser's IndexedDB, per user id.
(function () {
  "use strict";
  var holder = document.getElementById("signing-key");
  if (!holder) return;
  var user = holder.getAttribute("data-user");
  var statusEl = document.getElementById("signing-key-status");
  var fileInput = document.getElementById("signing-key-file");
  var DB = "pilothouse-signing", STORE = "keys";

  function setStatus(text, bad) {
    statusEl.textContent = text;
    statusEl.classList.toggle("bad", !!bad);
  }

  function db() {
    return new Promise(function (resolve, reject) {
      var req = indexedDB.open(DB, 1);
      req.onupgradeneeded = function () { req.result.createObjectStore(STORE); };
      req.onsuccess = function () { resolve(req.result); };
      req.onerror = function () { reject(req.error); };
    });
  }

  function store(mode, fn) {
    return db().then(function (d) {
      return new Promise(function (resolve, reject) {
        var tx = d.transaction(STORE, mode), req = fn(tx.objectStore(STORE));
        tx.oncomplete = function () { resolve(req.result); };
        tx.onerror = function () { reject(tx.error); };
      });
    });
  }

  function loadKey() { return store("readonly", function (s) { return s.get(user); }); }

  function b64ToBytes(b64) {
    var bin = atob(b64.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((b64.length + 3) % 4));
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function bytesToB64url(buf) {
    var bytes = new Uint8Array(buf), bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function hex(buf) {
    return Array.prototype.map.call(new Uint8Array(buf), function (b) { return ("0" + b.toString(16)).slice(-2); })
      .join("");
  }

  // The same key id as pilothouse.bus.attestation.key_id: "ed25519:" + 16 hex digits of SHA-256(raw public key).
  function importPem(text) {
    var m = /-----BEGIN PRIVATE KEY-----([\s\S]+?)-----END PRIVATE KEY-----/.exec(text);
    if (!m) return Promise.reject(new Error("not a PKCS#8 PEM private key file"));
    var der = b64ToBytes(m[1].replace(/\s+/g, ""));
    var alg = { name: "Ed25519" };
    return crypto.subtle.importKey("pkcs8", der, alg, true, ["sign"]).then(function (k) {
      return crypto.subtle.exportKey("jwk", k);
    }).then(function (jwk) {
      return Promise.all([
        crypto.subtle.digest("SHA-256", b64ToBytes(jwk.x)),
        crypto.subtle.importKey("jwk", jwk, alg, false, ["sign"])  // non-extractable from here on
      ]);
    }).then(function (r) { return { key: r[1], key_id: "ed25519:" + hex(r[0]).slice(0, 16), user: user }; });
  }

  function showLoaded() {
    return loadKey().then(function (k) {
      if (k) setStatus("signing key " + k.key_id + " ready for " + user);
      else setStatus("no signing key loaded: load your key file to sign decisions", true);
    });
  }

  if (!window.crypto || !crypto.subtle || !window.indexedDB) {
    setStatus("this page cannot sign (WebCrypto needs HTTPS or localhost); use the CLI: pilothouse approve --key", true);
    return;
  }

  fileInput.addEventListener("change", function () {
    var f = fileInput.files && fileInput.files[0];
    if (!f) return;
    f.text().then(importPem).then(function (k) {
      return store("readwrite", function (s) { return s.put(k, user); });
    }).then(showLoaded).catch(function (e) {
      setStatus("key not loaded: " + (e && e.message ? e.message : e), true);
    }).then(function () { fileInput.value = ""; });
  });

  // What the statement must say, from the form the person filled in (never trust the server's text blindly).
  function expected(form, kind) {
    var v = function (n) { var el = form.querySelector("[name=" + n + "]:checked") || form.elements[n];
                           return el ? el.value : ""; };
    if (kind === "approval") return { decision: v("decision"), action_hash: v("action_hash"), approver_id: user };
    if (kind === "validation") return { verdict: v("verdict"), validator_id: user };
    return { scope: v("scope"), engaged: v("engaged") === "true", actor: user };
  }

  function body(form, kind) {
    var v = function (n) { var el = form.querySelector("[name=" + n + "]:checked") || form.elements[n];
                           return el ? el.value : ""; };
    if (kind === "approval") return { decision: v("decision"), action_hash: v("action_hash") };
    if (kind === "validation") return { verdict: v("verdict") };
    return { scope: v("scope"), engaged: v("engaged") === "true", reason: v("reason") };
  }

  function fail(form, text) {
    var out = form.querySelector(".sign-status");
    out.hidden = false;
    out.textContent = text;
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var kind = form.getAttribute && form.getAttribute("data-sign");
    if (!kind || form.elements.signature.value) return;  // already signed: let it go
    ev.preventDefault();
    var exp = expected(form, kind);
    loadKey().then(function (k) {
      if (!k) {
        if (kind === "kill_switch" && exp.engaged) { form.submit(); return null; }  // engaging needs no signature
        throw new Error("load your signing key first (top of the page): decisions count only when you sign them");
      }
      return fetch(form.getAttribute("data-statement-url"), {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": form.elements.csrf_token.value },
        body: JSON.stringify(body(form, kind))
      }).then(function (r) {
        return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.status); return j; });
      }).then(function (st) {
        var bytes = b64ToBytes(st.signing_input);
        var text = new TextDecoder().decode(bytes);
        var doc = JSON.parse(text.slice(text.indexOf("\n") + 1));
        Object.keys(exp).forEach(function (f) {
          if (doc[f] !== exp[f]) throw new Error("the statement says " + f + "=" + doc[f] + ", not " + exp[f] +
                                                 ": not signed");
        });
        return crypto.subtle.sign({ name: "Ed25519" }, k.key, bytes).then(function (sig) {
          form.elements.statement_id.value = st.statement_id;
          form.elements.key_id.value = k.key_id;
          form.elements.signature.value = bytesToB64url(sig);
          form.submit();
        });
      });
    }).catch(function (e) { fail(form, "Not recorded: " + (e && e.message ? e.message : e)); });
  });

  showLoaded();
})();
