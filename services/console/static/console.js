// pilothouse console: live updates over server-sent events and expiry countdowns. No framework, no build step.
// Regions marked data-live="URL" are re-fetched when the server says something changed, unless the keyboard focus
// is inside them (never move what someone is working in).
(function () {
  "use strict";
  var live = document.getElementById("live");

  function announce(text) {
    if (!live) return;
    live.hidden = false;
    live.textContent = text;
  }

  // Typed text or a chosen radio button must never be wiped by an update.
  function hasUserInput(el) {
    var fields = el.querySelectorAll("textarea, input:not([type=hidden])");
    for (var i = 0; i < fields.length; i++) {
      var f = fields[i];
      if ((f.type === "radio" || f.type === "checkbox") ? f.checked !== f.defaultChecked : f.value !== f.defaultValue) {
        return true;
      }
    }
    return false;
  }

  function refresh() {
    var regions = document.querySelectorAll("[data-live]");
    regions.forEach(function (el) {
      if (el.contains(document.activeElement) || hasUserInput(el)) return;
      fetch(el.getAttribute("data-live"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null || el.contains(document.activeElement) || hasUserInput(el)) return;
          var doc = new DOMParser().parseFromString(html, "text/html");
          var main = doc.getElementById("main");
          var source = main || doc.body;
          // fragments are rendered through base.html only for errors; a fragment is the body itself
          var fresh = source.innerHTML;
          if (el.tagName === "TBODY") {
            var t = document.createElement("table");
            t.innerHTML = "<tbody>" + html + "</tbody>";
            fresh = t.tBodies[0].innerHTML;
          }
          if (el.innerHTML !== fresh) {
            el.innerHTML = fresh;
            tick();
          }
        })
        .catch(function () { /* the next change event retries */ });
    });
  }

  function fmt(ms) {
    if (ms <= 0) return "expired";
    var s = Math.floor(ms / 1000), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-expires-at]").forEach(function (el) {
      var at = parseInt(el.getAttribute("data-expires-at"), 10);
      if (!isNaN(at)) {
        el.textContent = fmt(at - now);
        el.classList.toggle("expiring", at - now < 60000);
      }
    });
  }

  if (document.querySelector("[data-live]") && window.EventSource) {
    var first = true;
    var es = new EventSource("/events");
    es.addEventListener("change", function () {
      if (first) { first = false; return; }  // the first event only tells the current version
      refresh();
      announce("Updated " + new Date().toLocaleTimeString());
    });
    es.onerror = function () { announce("Live updates reconnecting…"); };
  }
  tick();
  setInterval(tick, 1000);
})();
