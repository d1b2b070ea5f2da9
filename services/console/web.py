"""The console's HTTP side: server-rendered pages (jinja2), a JSON API for the same decisions, live updates (SSE).

Every POST needs a logged-in session and its CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``),
compared in constant time. The person acting is taken only from the session. A decision is answered with success
only after the broker acknowledged it; a refusal is answered 4xx with the reason, and nothing is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pilothouse.bus.attestation import HumanKeyFile, HumanKeyRegistry
from pilothouse.bus.errors import PilothouseError, RetryableError
from pilothouse.console.auth import Account, IdentityProvider, Session, SessionStore, csrf_ok
from pilothouse.console.config import ConsoleSettings
from pilothouse.console.domain import (
    GLOBAL_SCOPE,
    DecisionRefused,
    ReadModel,
    Statement,
    action_status,
    approval_statement,
    build_approval,
    build_kill_switch,
    build_validation,
    kill_switch_statement,
    signature_from,
    take_statement,
    validation_statement,
    verify_signed,
    check_can_decide,
    check_can_switch,
    check_can_validate,
    clean_comment,
    confidence_pct,
    epoch_ms,
    parse_json_object,
    utcnow,
)
from pilothouse.console.publish import DecisionSink

log = logging.getLogger("pilothouse.console")

HERE = Path(__file__).parent
COOKIE = "pilothouse_session"
MAX_BODY_BYTES = 64 * 1024
SSE_POLL_S = 0.3
SSE_MAX_LIFETIME_S = 300  # the browser's EventSource reconnects; no stream lives forever
LOGIN_FAILURES_ALLOWED = 5
LOGIN_FAILURE_WINDOW_S = 300
MAX_STATEMENTS_PER_SESSION = 32

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class LoginThrottle:
    """At most LOGIN_FAILURES_ALLOWED failed logins per account name per window (slows password guessing)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def blocked(self, name: str) -> bool:
        now = self._clock()
        with self._lock:
            recent = [t for t in self._failures.get(name, []) if now - t < LOGIN_FAILURE_WINDOW_S]
            self._failures[name] = recent
            return len(recent) >= LOGIN_FAILURES_ALLOWED

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures.setdefault(name, []).append(self._clock())
            if len(self._failures) > 10_000:
                self._failures.clear()

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


class Console:
    """The web application and its collaborators (read model, decision sink, identity, sessions)."""

    def __init__(self, settings: ConsoleSettings, model: ReadModel, sink: DecisionSink, identity: IdentityProvider,
                 *, sessions: SessionStore | None = None, clock: Callable[[], datetime] = utcnow):
        self.settings = settings
        self.model = model
        self.sink = sink
        self.identity = identity
        self.sessions = sessions or SessionStore(settings.session_secret.get_secret_value().encode(),
                                                 settings.session_ttl_s)
        self.clock = clock
        self.throttle = LoginThrottle()
        # Read-only: the console checks signatures early; it never holds a private key and cannot enrol one.
        self._humans = HumanKeyFile(settings.human_keys) if settings.human_keys else None
        self.stopping = threading.Event()
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(confidence_pct=confidence_pct, epoch_ms=epoch_ms, parse_json=parse_json_object,
                                fmt_time=_fmt_time, safe_href=safe_href)
        self.app = Starlette(routes=self._routes())
        self.app.state.console = self

    # ---- plumbing --------------------------------------------------------------------------------------------

    def _routes(self) -> list:
        return [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login_form, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.incidents_page, methods=["GET"]),
            Route("/incidents/{incident_id}", self.incident_page, methods=["GET"]),
            Route("/actions", self.actions_page, methods=["GET"]),
            Route("/actions/{action_id}", self.action_page, methods=["GET"]),
            Route("/status", self.status_page, methods=["GET"]),
            Route("/hypotheses/{hypothesis_id}/decision", self.validate_form, methods=["POST"]),
            Route("/actions/{action_id}/decision", self.decide_form, methods=["POST"]),
            Route("/kill-switch", self.kill_switch_form, methods=["POST"]),
            Route("/fragments/incidents", self.incidents_fragment, methods=["GET"]),
            Route("/fragments/incidents/{incident_id}/{part:str}", self.incident_fragment, methods=["GET"]),
            Route("/fragments/actions/{action_id}/{part:str}", self.action_fragment, methods=["GET"]),
            Route("/fragments/actions", self.actions_fragment, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),
            Route("/api/session", self.api_login, methods=["POST"]),
            Route("/api/logout", self.api_logout, methods=["POST"]),
            Route("/api/incidents", self.api_incidents, methods=["GET"]),
            Route("/api/incidents/{incident_id}", self.api_incident, methods=["GET"]),
            Route("/api/actions", self.api_actions, methods=["GET"]),
            Route("/api/actions/{action_id}", self.api_action, methods=["GET"]),
            Route("/api/status", self.api_status, methods=["GET"]),
            Route("/api/hypotheses/{hypothesis_id}/statement", self.api_validate_statement, methods=["POST"]),
            Route("/api/actions/{action_id}/statement", self.api_decide_statement, methods=["POST"]),
            Route("/api/kill-switch/statement", self.api_kill_switch_statement, methods=["POST"]),
            Route("/api/hypotheses/{hypothesis_id}/decision", self.api_validate, methods=["POST"]),
            Route("/api/actions/{action_id}/decision", self.api_decide, methods=["POST"]),
            Route("/api/kill-switch", self.api_kill_switch, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def account_of(self, request: Request) -> Account | None:
        s = self.session_of(request)
        return s.account if s else None

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, self.sessions.cookie_value(session), max_age=self.settings.session_ttl_s,
                            httponly=True, samesite="strict", secure=self.settings.secure_cookies, path="/")

    def render(self, name: str, request: Request, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        session = self.session_of(request)
        flash: list[str] = []
        if session is not None and session.flash and not name.startswith("_"):  # fragments keep them
            flash, session.flash = session.flash, []
        html = self.env.get_template(name).render(
            request=request, session=session, account=session.account if session else None,
            csrf_token=session.csrf_token if session else "", flash=flash, now=self.clock(),
            kill=self.model.kill_switch(GLOBAL_SCOPE), **ctx)
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    @staticmethod
    def json(data: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(data, status_code=status, headers=SECURITY_HEADERS)

    def _need_page_login(self, request: Request) -> Response | None:
        if self.account_of(request) is None:
            return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        return None

    async def _form(self, request: Request) -> dict[str, str]:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise DecisionRefused(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="too_large")
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}

    async def _json_body(self, request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise DecisionRefused("send Content-Type: application/json", status=415, code="content_type")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise DecisionRefused(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="too_large")
        try:
            data = json.loads(body or b"{}")
        except ValueError as e:
            raise DecisionRefused(f"body is not valid JSON: {e}", status=400, code="bad_json") from None
        if not isinstance(data, dict):
            raise DecisionRefused("body must be a JSON object", status=400, code="bad_json")
        return data

    def _authorised_post(self, request: Request, token: str | None) -> Session:
        session = self.session_of(request)
        if session is None or session.account is None:
            raise DecisionRefused("log in first (no valid session)", status=401, code="no_session")
        if not csrf_ok(session, token):
            raise DecisionRefused("missing or wrong CSRF token; reload the page and try again", status=403,
                                  code="csrf")
        return session

    def _registry(self) -> HumanKeyRegistry | None:
        return self._humans.registry() if self._humans is not None else None

    @staticmethod
    def _issue(session: Session, statement: Statement) -> Statement:
        """Remember a statement this person was asked to sign (bounded: the oldest are forgotten)."""
        while len(session.statements) >= MAX_STATEMENTS_PER_SESSION:
            session.statements.pop(next(iter(session.statements)))
        session.statements[statement.statement_id] = statement
        return statement

    def _unsigned(self, session: Session, statement: Statement) -> DecisionRefused:
        self._issue(session, statement)
        return DecisionRefused(
            "unsigned: a decision counts only with your own signature. Sign the statement returned here (its "
            "signing_input bytes) with your key and send the same decision again with statement_id, key_id and "
            "signature", status=428, code="signature_required", extra={"statement": statement.public()})

    # ---- decisions (shared by forms and API) ----------------------------------------------------------------

    async def _send(self, record) -> None:
        try:
            await run_in_threadpool(self.sink.send, record)
        except RetryableError as e:
            log.warning("decision not acknowledged", extra={"error": str(e), "event_id": record.event_id})
            raise DecisionRefused(f"not recorded: the bus did not acknowledge ({e}); nothing was sent, try again",
                                  status=503, code="bus_unavailable") from e
        except PilothouseError as e:
            log.error("decision refused by the bus", extra={"error": str(e), "event_id": record.event_id})
            raise DecisionRefused(f"not recorded: the bus refused it ({e})", status=502, code="bus_refused") from e
        self.model.record_own(record)
        log.info("decision recorded", extra={"event_id": record.event_id, "incident_id": record.incident_id,
                                             "type": type(record).__name__})

    # Each decision: checks first (the same as before signing), then the signature must answer a statement this
    # session was given for this very decision; the record is built from the statement and forwarded unchanged.

    def validation_statement(self, session: Session, hypothesis_id: str, data: dict[str, Any]) -> Statement:
        proposal, hyp = check_can_validate(self.model, session.account, hypothesis_id)
        return validation_statement(session.account, proposal, hyp, str(data.get("verdict", "")), self.clock())

    def decision_statement(self, session: Session, action_id: str, data: dict[str, Any]) -> Statement:
        now = self.clock()
        decision = str(data.get("decision", ""))
        pending = check_can_decide(self.model, session.account, action_id, data.get("action_hash"), decision, now)
        return approval_statement(session.account, pending, decision, now,
                                  timedelta(seconds=self.settings.approval_ttl_s))

    def kill_switch_statement(self, session: Session, data: dict[str, Any]) -> tuple[Statement, str]:
        scope = str(data.get("scope") or GLOBAL_SCOPE)
        reason = clean_comment(data.get("reason"), self.settings.max_comment_chars)
        engaged = data.get("engaged")
        if isinstance(engaged, str):
            engaged = {"true": True, "on": True, "engage": True, "false": False, "off": False,
                       "release": False}.get(engaged.lower())
        if not isinstance(engaged, bool):
            raise DecisionRefused("engaged must be true or false", status=400, code="bad_engaged")
        check_can_switch(session.account, scope, reason)
        return kill_switch_statement(session.account, scope, engaged, self.clock()), reason

    async def do_validate(self, session: Session, hypothesis_id: str, data: dict[str, Any]):
        account = session.account
        proposal, hyp = check_can_validate(self.model, account, hypothesis_id)
        comment = clean_comment(data.get("comment"), self.settings.max_comment_chars)
        sig = signature_from(data)
        if sig is None:
            raise self._unsigned(session, self.validation_statement(session, hypothesis_id, data))
        st = take_statement(session.statements, sig, "validation", hypothesis_id, self.clock())
        if data.get("verdict") not in (None, "", st.fields["verdict"]):
            raise DecisionRefused(f"you signed '{st.fields['verdict']}' but sent '{data.get('verdict')}'", status=400,
                                  code="statement_mismatch")
        record = build_validation(account, proposal, hyp, st, sig, comment)
        verify_signed(self._registry(), record)
        await self._send(record)
        return record

    async def do_decide(self, session: Session, action_id: str, data: dict[str, Any]):
        account = session.account
        now = self.clock()
        decision = str(data.get("decision", ""))
        pending = check_can_decide(self.model, account, action_id, data.get("action_hash"), decision, now)
        comment = clean_comment(data.get("comment"), self.settings.max_comment_chars)
        sig = signature_from(data)
        if sig is None:
            raise self._unsigned(session, self.decision_statement(session, action_id, data))
        st = take_statement(session.statements, sig, "approval", action_id, now)
        if (st.fields["decision"], st.fields["action_hash"]) != (decision, pending.action_hash):
            raise DecisionRefused("the signed statement is for another decision or another version of this action; "
                                  "ask for the statement again and sign it", status=400, code="statement_mismatch")
        record = build_approval(account, pending, st, sig, comment, now)
        verify_signed(self._registry(), record)
        await self._send(record)
        return record

    async def do_kill_switch(self, session: Session, data: dict[str, Any]):
        account = session.account
        fresh, reason = self.kill_switch_statement(session, data)
        sig = signature_from(data)
        if sig is None and not fresh.fields["engaged"]:
            # Releasing lets automation act again: policy and the actuator apply it only with an admin's signature.
            raise self._unsigned(session, fresh)
        st = None
        if sig is not None:
            st = take_statement(session.statements, sig, "kill_switch", fresh.subject, self.clock())
            if st.fields["engaged"] != fresh.fields["engaged"]:
                raise DecisionRefused("the signed statement engages/releases the other way", status=400,
                                      code="statement_mismatch")
        # Engaging only stops things: it is accepted unsigned (anyone with the admin role can pull the brake).
        record = build_kill_switch(account, fresh.subject, fresh.fields["engaged"], reason, self.clock(), st, sig)
        if sig is not None:
            verify_signed(self._registry(), record)
        await self._send(record)
        return record

    # ---- pages ------------------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is not None and session.account is not None:
            return RedirectResponse("/", status_code=303)
        if session is None:
            session = self.sessions.create()
        resp = self.env.get_template("login.html").render(csrf_token=session.csrf_token, error=None, account=None,
                                                         username="", kill=None, flash=[])
        out = HTMLResponse(resp, headers=SECURITY_HEADERS)
        self._set_cookie(out, session)
        return out

    async def login_form(self, request: Request) -> Response:
        session = self.session_of(request)
        form = await self._form(request)
        username = form.get("username", "")

        def again(msg: str, status: int) -> Response:
            s = session or self.sessions.create()
            html = self.env.get_template("login.html").render(csrf_token=s.csrf_token, error=msg, account=None,
                                                             username=username, kill=None, flash=[])
            out = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
            self._set_cookie(out, s)
            return out

        if not csrf_ok(session, form.get("csrf_token")):
            session = None
            return again("Your login form expired; please try again.", 403)
        account, problem = await self._authenticate(username, form.get("password", ""))
        if account is None:
            return again(problem, 429 if "too many" in problem else 401)
        self.sessions.destroy(session)  # a fresh id at login: an id seen before login is never promoted
        new = self.sessions.create(account)
        resp = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
        self._set_cookie(resp, new)
        return resp

    async def _authenticate(self, username: str, password: str) -> tuple[Account | None, str]:
        key = username.strip().lower()[:256]
        if self.throttle.blocked(key):
            return None, "Too many failed logins for this account; wait a few minutes."
        account = await run_in_threadpool(self.identity.authenticate, username, password)
        if account is None:
            self.throttle.failed(key)
            return None, "Unknown user or wrong password."
        self.throttle.succeeded(key)
        log.info("login", extra={"principal": account.id})
        return account, ""

    async def logout(self, request: Request) -> Response:
        form = await self._form(request)
        session = self.session_of(request)
        if session is not None and csrf_ok(session, form.get("csrf_token")):
            self.sessions.destroy(session)
        resp = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def incidents_page(self, request: Request) -> Response:
        return self._need_page_login(request) or self.render(
            "incidents.html", request, incidents=self.model.incident_list(), pending=self.model.pending_list(self.clock()))

    async def incidents_fragment(self, request: Request) -> Response:
        return self._need_page_login(request) or self.render(
            "_incident_rows.html", request, incidents=self.model.incident_list())

    def _incident_ctx(self, incident_id: str) -> dict[str, Any] | None:
        inc = self.model.incidents.get(incident_id)
        hyps = self.model.latest_hypotheses(incident_id)
        if inc is None and hyps is None:
            return None
        now = self.clock()
        actions = [(aid, self.model.pending.get(aid) or self.model.proposals.get(aid), action_status(self.model, aid, now))
                   for aid in self.model.actions_of(incident_id)]
        validators = {h.hypothesis_id: self.model.validators_of(h.hypothesis_id) for h in (hyps.hypotheses if hyps else [])}
        return {"incident": inc, "incident_id": incident_id, "hyps": hyps, "evidence": self.model.evidence(incident_id),
                "timeline": self.model.timeline(incident_id), "actions": actions, "validators": validators}

    async def incident_page(self, request: Request) -> Response:
        if (r := self._need_page_login(request)) is not None:
            return r
        ctx = self._incident_ctx(request.path_params["incident_id"])
        if ctx is None:
            return self.render("not_found.html", request, 404, what="incident")
        return self.render("incident.html", request, **ctx)

    async def incident_fragment(self, request: Request) -> Response:
        if (r := self._need_page_login(request)) is not None:
            return r
        template = {"timeline": "_timeline.html", "hypotheses": "_hypotheses.html"}.get(request.path_params["part"])
        ctx = self._incident_ctx(request.path_params["incident_id"])
        if ctx is None or template is None:
            return self.render("not_found.html", request, 404, what="incident")
        return self.render(template, request, **ctx)

    async def actions_page(self, request: Request) -> Response:
        return self._need_page_login(request) or self.render(
            "actions.html", request, pending=self.model.pending_list(self.clock()))

    async def actions_fragment(self, request: Request) -> Response:
        return self._need_page_login(request) or self.render(
            "_action_rows.html", request, pending=self.model.pending_list(self.clock()))

    def _action_ctx(self, action_id: str) -> dict[str, Any] | None:
        m = self.model
        pending, proposal = m.pending.get(action_id), m.proposals.get(action_id)
        if pending is None and proposal is None:
            return None
        source = pending or proposal
        return {"action_id": action_id, "pending": pending, "proposal": proposal, "source": source,
                "params": parse_json_object(source.params_json), "shadow": m.shadow.get(action_id),
                "shadow_prediction": parse_json_object(m.shadow[action_id].prediction_json) if action_id in m.shadow else None,
                "status": action_status(m, action_id, self.clock()), "approvals": m.approvals_of(action_id),
                "decisions": m.decisions.get(action_id, []), "authorized": m.authorized.get(action_id),
                "execution": m.executions.get(action_id), "verification": m.verifications.get(action_id),
                "incident": m.incidents.get(source.incident_id)}

    async def action_page(self, request: Request) -> Response:
        if (r := self._need_page_login(request)) is not None:
            return r
        ctx = self._action_ctx(request.path_params["action_id"])
        if ctx is None:
            return self.render("not_found.html", request, 404, what="action")
        return self.render("action.html", request, **ctx)

    async def action_fragment(self, request: Request) -> Response:
        if (r := self._need_page_login(request)) is not None:
            return r
        template = {"status": "_action_status.html", "details": "_action_details.html"}.get(request.path_params["part"])
        ctx = self._action_ctx(request.path_params["action_id"])
        if ctx is None or template is None:
            return self.render("not_found.html", request, 404, what="action")
        return self.render(template, request, **ctx)

    async def status_page(self, request: Request) -> Response:
        return self._need_page_login(request) or self.render(
            "status.html", request, switches=dict(self.model.kill_switches), budgets=self.model.budgets(),
            ledger=self.model.ledger)

    async def _form_decision(self, request: Request, run, back: str) -> Response:
        try:
            form = await self._form(request)
            session = self._authorised_post(request, form.get("csrf_token"))
            record = await run(session, form)
        except DecisionRefused as e:
            session = self.session_of(request)
            if e.status == 401 or session is None:
                return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
            return self.render("refused.html", request, e.status, message=str(e), code=e.code, back=back)
        self.session_of(request).flash.append(_recorded_text(record))
        return RedirectResponse(back, status_code=303, headers=SECURITY_HEADERS)

    async def validate_form(self, request: Request) -> Response:
        hid = request.path_params["hypothesis_id"]
        found = self.model.find_hypothesis(hid)
        back = f"/incidents/{found[0].incident_id}#hyp-{hid}" if found else "/"
        return await self._form_decision(request, lambda a, f: self.do_validate(a, hid, f), back)

    async def decide_form(self, request: Request) -> Response:
        aid = request.path_params["action_id"]
        return await self._form_decision(request, lambda a, f: self.do_decide(a, aid, f), f"/actions/{aid}")

    async def kill_switch_form(self, request: Request) -> Response:
        return await self._form_decision(request, self.do_kill_switch, "/status")

    async def events(self, request: Request) -> Response:
        if self.account_of(request) is None:
            return self.json({"error": "log in first"}, 401)

        async def stream():
            seen = -1
            started = last_sent = time.monotonic()
            yield "retry: 2000\n\n"
            while not self.stopping.is_set() and time.monotonic() - started < SSE_MAX_LIFETIME_S:
                if await request.is_disconnected():
                    return
                v = self.model.version
                if v != seen:
                    seen = v
                    last_sent = time.monotonic()
                    yield f"event: change\ndata: {v}\n\n"
                elif time.monotonic() - last_sent > 15:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})

    async def healthz(self, request: Request) -> Response:
        return self.json({"ok": True})

    # ---- JSON API ---------------------------------------------------------------------------------------------

    async def api_login(self, request: Request) -> Response:
        try:
            data = await self._json_body(request)
        except DecisionRefused as e:
            return self.json({"error": str(e), "code": e.code}, e.status)
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            return self.json({"error": "username and password (strings) are required", "code": "bad_credentials"}, 400)
        account, problem = await self._authenticate(username, password)
        if account is None:
            return self.json({"error": problem, "code": "login_failed"}, 429 if "too many" in problem.lower() else 401)
        old = self.session_of(request)
        if old is not None:
            self.sessions.destroy(old)
        session = self.sessions.create(account)
        resp = self.json({"csrf_token": session.csrf_token, "account": account.model_dump(mode="json"),
                          "expires_at": int(session.expires_at)})
        self._set_cookie(resp, session)
        return resp

    async def api_logout(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None or not csrf_ok(session, request.headers.get("x-csrf-token")):
            return self.json({"error": "no valid session or CSRF token", "code": "csrf"}, 403)
        self.sessions.destroy(session)
        resp = self.json({"ok": True})
        resp.delete_cookie(COOKIE, path="/")
        return resp

    def _api_account(self, request: Request) -> Account | Response:
        account = self.account_of(request)
        return account if account is not None else self.json({"error": "log in first", "code": "no_session"}, 401)

    async def api_incidents(self, request: Request) -> Response:
        if isinstance(a := self._api_account(request), Response):
            return a
        return self.json([{"incident_id": i.incident_id, "title": i.title, "state": i.state, "severity": i.severity,
                           "primary_service": i.primary_service, "last_seen": i.last_seen.isoformat()}
                          for i in self.model.incident_list()])

    async def api_incident(self, request: Request) -> Response:
        if isinstance(a := self._api_account(request), Response):
            return a
        ctx = self._incident_ctx(request.path_params["incident_id"])
        if ctx is None:
            return self.json({"error": "unknown incident", "code": "unknown"}, 404)
        return self.json({
            "incident": ctx["incident"].model_dump(mode="json") if ctx["incident"] else None,
            "hypotheses": ctx["hyps"].model_dump(mode="json") if ctx["hyps"] else None,
            "validations": ctx["validators"],
            "actions": [{"action_id": aid, "state": st.state, "status": st.text} for aid, _, st in ctx["actions"]],
        })

    async def api_actions(self, request: Request) -> Response:
        if isinstance(a := self._api_account(request), Response):
            return a
        return self.json([_pending_json(p) for p in self.model.pending_list(self.clock())])

    async def api_action(self, request: Request) -> Response:
        if isinstance(a := self._api_account(request), Response):
            return a
        ctx = self._action_ctx(request.path_params["action_id"])
        if ctx is None:
            return self.json({"error": "unknown action", "code": "unknown"}, 404)
        return self.json({
            "action_id": ctx["action_id"], "state": ctx["status"].state, "status": ctx["status"].text,
            "pending": _pending_json(ctx["pending"]) if ctx["pending"] else None,
            "proposal": ctx["proposal"].model_dump(mode="json") if ctx["proposal"] else None,
            "shadow": ctx["shadow"].model_dump(mode="json") if ctx["shadow"] else None,
            "approvals": [{"approval_id": a.approval_id, "approver_id": a.approver_id, "decision": a.decision,
                           "at": a.at.isoformat()} for a in ctx["approvals"]],
        })

    async def api_status(self, request: Request) -> Response:
        if isinstance(a := self._api_account(request), Response):
            return a
        led = self.model.ledger
        return self.json({
            "kill_switches": {scope: {"engaged": k.engaged, "changed_by": k.changed_by, "reason": k.reason,
                                      "at": k.occurred_at.isoformat()} for scope, k in self.model.kill_switches.items()},
            "budgets": {w: {"remaining": p.budget_remaining, "as_of": p.occurred_at.isoformat()}
                        for w, p in self.model.budgets().items()},
            "ledger": {"last_sequence": led.last_sequence, "last_entry_hash": led.last_entry_hash,
                       "checkpoint_tree_size": led.checkpoint_tree_size, "checkpoint_root": led.checkpoint_root,
                       "entries_after_checkpoint": led.uncheckpointed},
        })

    async def _api_decision(self, request: Request, run) -> Response:
        try:
            session = self._authorised_post(request, request.headers.get("x-csrf-token"))
            data = await self._json_body(request)
            record = await run(session, data)
        except DecisionRefused as e:
            return self.json({"error": str(e), "code": e.code, **e.extra}, e.status)
        return self.json({"recorded": True, "event_id": record.event_id, "message": _recorded_text(record),
                          "record": record.model_dump(mode="json")}, 201)

    async def api_validate(self, request: Request) -> Response:
        hid = request.path_params["hypothesis_id"]
        return await self._api_decision(request, lambda a, d: self.do_validate(a, hid, d))

    async def api_decide(self, request: Request) -> Response:
        aid = request.path_params["action_id"]
        return await self._api_decision(request, lambda a, d: self.do_decide(a, aid, d))

    async def api_kill_switch(self, request: Request) -> Response:
        return await self._api_decision(request, self.do_kill_switch)

    async def _api_statement(self, request: Request, make) -> Response:
        """Step one of a decision: the exact statement to sign (the console picks ids, expiry and time)."""
        try:
            session = self._authorised_post(request, request.headers.get("x-csrf-token"))
            data = await self._json_body(request)
            statement = self._issue(session, make(session, data))
        except DecisionRefused as e:
            return self.json({"error": str(e), "code": e.code, **e.extra}, e.status)
        return self.json(statement.public())

    async def api_validate_statement(self, request: Request) -> Response:
        hid = request.path_params["hypothesis_id"]
        return await self._api_statement(request, lambda s, d: self.validation_statement(s, hid, d))

    async def api_decide_statement(self, request: Request) -> Response:
        aid = request.path_params["action_id"]
        return await self._api_statement(request, lambda s, d: self.decision_statement(s, aid, d))

    async def api_kill_switch_statement(self, request: Request) -> Response:
        return await self._api_statement(request, lambda s, d: self.kill_switch_statement(s, d)[0])


def _pending_json(p) -> dict[str, Any]:
    return {"action_id": p.action_id, "incident_id": p.incident_id, "action_type": p.action_type,
            "target_kind": p.target_kind, "target": p.target, "params_json": p.params_json,
            "action_hash": p.action_hash, "proposed_by": p.proposed_by, "approvers_needed": p.approvers_needed,
            "approver_roles": list(p.approver_roles), "approved_by": list(p.approved_by), "reasons": list(p.reasons),
            "risk_score": p.risk_score, "budget_remaining": p.budget_remaining, "budget_window": p.budget_window,
            "expires_at": p.expires_at.isoformat()}


def _recorded_text(record) -> str:
    name = type(record).__name__
    if name == "ApprovalRecorded":
        return f"Recorded: you {'approved' if record.decision == 'approve' else 'rejected'} action {record.action_id}."
    if name == "HypothesisValidated":
        return f"Recorded: you {record.verdict} hypothesis {record.hypothesis_id}."
    return f"Recorded: kill switch '{record.scope}' {'engaged' if record.engaged else 'released'}."


def safe_href(url: str) -> str | None:
    """A link only for http(s) or same-site paths; anything else (javascript:, data:) is shown as text."""
    if not isinstance(url, str):
        return None
    u = url.strip()
    if u.lower().startswith(("http://", "https://")) or (u.startswith("/") and not u.startswith("//")):
        return u
    return None


def _fmt_time(dt: datetime | None) -> str:
    return "" if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S UTC")
