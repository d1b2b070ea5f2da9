"""The approval console in a real browser, end to end over the real broker.

The test plays sensing, reasoning, policy and the actuator by producing their records as the admin principal; the
console consumes them as its own principal, and the people's decisions travel back over Kafka. Set
``PILOTHOUSE_SCREENSHOTS=docs`` to refresh docs/console-incident.png and docs/console-pending-action.png.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated
from pilothouse.bus import attestation
from tests.e2e.console_harness import (
    RunningConsole,
    key_file,
    password_of,
    publish,
    read_topic_until,
    write_human_keys,
    write_users_file,
)
from tests.e2e.console_world import World

ROOT = Path(__file__).resolve().parents[2]
WAIT_MS = 30_000


def log_in(page: Page, url: str, user: str) -> None:
    """Keyboard only: the user-name field has focus, Tab to the password, Enter submits."""
    page.goto(url + "/login")
    expect(page.locator("#username")).to_be_focused()
    page.keyboard.type(user)
    page.keyboard.press("Tab")
    expect(page.locator("#password")).to_be_focused()
    page.keyboard.type(password_of(user))
    page.keyboard.press("Enter")
    expect(page.get_by_text(f"({user};")).to_be_visible()


def load_key(page: Page, directory: Path, user: str) -> None:
    """The person loads their own key file once; the browser keeps it (non-extractable) and signs with it."""
    page.locator("#signing-key-file").set_input_files(str(key_file(directory, user)))
    expect(page.locator("#signing-key-status")).to_contain_text(f"ready for {user}")


def new_page(browser, errors: list[str]) -> Page:
    ctx = browser.new_context(viewport={"width": 1366, "height": 860})
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


@pytest.fixture
def shots(tmp_path):
    out = ROOT / "docs" if os.environ.get("PILOTHOUSE_SCREENSHOTS") == "docs" else tmp_path
    return out


def test_validate_approve_twice_executed_and_verified(browser, bus_settings, tmp_path, shots):
    w = World()
    admin = bus_settings("admin")
    producer = BusProducer(admin)
    errors: list[str] = []
    registry = write_human_keys(tmp_path)
    with RunningConsole(bus_settings("console"), write_users_file(tmp_path), human_keys=registry) as rc:
        alice, bob, rita = (new_page(browser, errors) for _ in range(3))

        # Alice is watching the incident list when the incident opens: it appears without a reload.
        log_in(alice, rc.url, "alice")
        alice.keyboard.press("Tab")
        expect(alice.locator("a.skip")).to_be_focused()  # the first Tab reaches the skip link
        alice.evaluate("window.__marker = 'same page'")
        publish(admin, [w.alert(), w.incident()], producer)
        row = alice.get_by_role("link", name=re.compile(re.escape(w.tag)))
        expect(row).to_be_visible(timeout=60_000)  # the console first catches up with the topics: long on a busy stack
        assert alice.evaluate("window.__marker") == "same page"  # live update, not a reload

        # Reasoning proposes hypotheses; Rita follows a claim to its evidence and validates it (gate 1).
        # Rita has the incident open when the hypotheses arrive: they appear in place.
        log_in(rita, rc.url, "rita")
        load_key(rita, tmp_path, "rita")
        rita.goto(f"{rc.url}/incidents/{w.incident_id}")
        expect(rita.get_by_text("No hypotheses yet.")).to_be_visible()
        publish(admin, [w.hypotheses()], producer)
        card = rita.locator(f"#hyp-{w.h1}")
        expect(card).to_contain_text("82%")
        expect(rita.locator(f"#hyp-{w.h2}")).to_contain_text("inconclusive")
        expect(card).to_contain_text("cites evidence that does not exist")
        card.locator(f'a[href="#ev-{w.ev_deploy}"]').click()
        evidence = rita.locator(f"#ev-{w.ev_deploy}")
        expect(evidence).to_be_in_viewport()
        expect(evidence.get_by_role("link", name="source")).to_have_attribute(
            "href", "https://ci.example.test/deploys/checkout/v42")
        card.get_by_label("Validate").check()
        card.get_by_label("Comment").fill("deploy v42 lines up with the onset")
        card.get_by_role("button", name="Record verdict").click()
        expect(rita.locator(".flash")).to_contain_text(f"you validated hypothesis {w.h1}")
        rita.evaluate("window.scrollTo(0, 0)")
        rita.screenshot(path=str(shots / "console-incident.png"), full_page=False)
        validations = read_topic_until(admin, "pilothouse.console.hypothesis-validations.v1",
                                       lambda r: isinstance(r, HypothesisValidated) and r.hypothesis_id == w.h1)
        assert validations[0].validator_id == "rita"
        # Signed in rita's browser with her key: it verifies against the registry, as policy checks it.
        humans = attestation.HumanKeyRegistry.from_file(registry)
        assert humans.verify(validations[0]).signer == "rita"

        # Policy asks for two approvers; the actuator's shadow run predicts the outcome.
        publish(admin, [w.proposal(), w.pending(validated_by="rita"), w.shadow()], producer)
        rc.wait_for(lambda m: w.action_id in m.pending, what="the pending action")
        load_key(alice, tmp_path, "alice")
        alice.goto(f"{rc.url}/actions/{w.action_id}")
        expect(alice.locator("#shadow-summary")).to_contain_text("SLO met")
        expect(alice.locator("#action-hash")).to_have_text(w.hash)
        expect(alice.locator(".countdown").first).to_have_text(re.compile(r"^1[45]m \d+s$"))
        alice.screenshot(path=str(shots / "console-pending-action.png"), full_page=True)
        alice.get_by_label("Approve").check()
        alice.get_by_label("Comment").fill("prediction matches the v41 canary")
        alice.get_by_role("button", name="Record decision").click()
        expect(alice.locator(".flash")).to_contain_text("you approved")

        first = read_topic_until(admin, "pilothouse.console.approvals.v1",
                                 lambda r: isinstance(r, ApprovalRecorded) and r.action_id == w.action_id)
        assert (first[0].approver_id, first[0].action_hash) == ("alice", w.hash)
        assert humans.verify(first[0]).signer == "alice"
        publish(admin, [w.pending(approved_by=["alice"], validated_by="rita", minutes=0.5)], producer)
        expect(alice.locator("#approved-by")).to_contain_text("alice")
        expect(alice.locator("#action-state")).to_have_text("waiting")
        expect(alice.locator("#action-status-text")).to_contain_text("waiting for 1 more approval")

        # The second approver sees who approved so far and approves too.
        log_in(bob, rc.url, "bob")
        bob.goto(f"{rc.url}/actions/{w.action_id}")
        expect(bob.locator("#approved-by")).to_contain_text("alice")
        bob.get_by_label("Approve").check()
        # Without his key loaded, bob's browser refuses to send an unsigned decision, and says why.
        bob.get_by_role("button", name="Record decision").click()
        expect(bob.locator(".sign-status")).to_contain_text("load your signing key first")
        # Alice's key file in bob's browser: signed, but not with a key enrolled for bob: refused with the reason.
        bob.locator("#signing-key-file").set_input_files(str(key_file(tmp_path, "alice")))
        expect(bob.locator("#signing-key-status")).to_contain_text("ready for bob")
        bob.get_by_role("button", name="Record decision").click()
        expect(bob.get_by_text("not enrolled for bob")).to_be_visible()
        bob.goto(f"{rc.url}/actions/{w.action_id}")
        load_key(bob, tmp_path, "bob")
        bob.get_by_label("Approve").check()
        bob.get_by_role("button", name="Record decision").click()
        expect(bob.locator(".flash")).to_contain_text("you approved")
        both = read_topic_until(admin, "pilothouse.console.approvals.v1",
                                lambda r: isinstance(r, ApprovalRecorded) and r.action_id == w.action_id, want=2)
        assert sorted(r.approver_id for r in both) == ["alice", "bob"]
        assert sorted(humans.verify(r).signer for r in both) == ["alice", "bob"]

        # Policy authorizes with both approvals; the actuator executes and verifies. Alice's page follows live.
        publish(admin, [w.pending(approved_by=["alice", "bob"], validated_by="rita", minutes=0.8),
                        w.authorized([r.approval_id for r in both]), w.executed(), w.verified()], producer)
        expect(alice.locator("#action-state")).to_have_text("verified")
        expect(alice.locator("#action-status-text")).to_contain_text("executed and verified")
        expect(alice.get_by_text("error_ratio_below_slo")).to_be_visible()

        # Once executed, another approval is refused with the reason (the form is gone; a crafted POST is answered).
        r = alice.request.post(f"{rc.url}/actions/{w.action_id}/decision",
                               form={"decision": "approve", "action_hash": w.hash,
                                     "csrf_token": alice.locator('input[name="csrf_token"]').first.input_value()})
        assert r.status == 409 and "no longer waiting" in r.text()

    assert not [e for e in errors if "Content Security Policy" in e or "Uncaught" in e], errors


def focused(page: Page) -> str:
    return page.evaluate("""() => { const e = document.activeElement;
        return e.id ? '#' + e.id : (e.name ? e.tagName.toLowerCase() + '[name=' + e.name + '][value=' + e.value + ']'
               : e.tagName.toLowerCase() + ':' + (e.textContent || '').trim().slice(0, 40)); }""")


def test_gate_two_with_the_keyboard_only(browser, bus_settings, tmp_path):
    """Skip link, a visible focus ring, and the approve form reachable and usable with Tab, Space and Enter."""
    w = World(approvers_needed=1)
    admin = bus_settings("admin")
    errors: list[str] = []
    with RunningConsole(bus_settings("console"), write_users_file(tmp_path), human_keys=write_human_keys(tmp_path)) as rc:
        publish(admin, w.upstream())
        rc.wait_for(lambda m: w.action_id in m.pending and w.action_id in m.shadow, what="the pending action")
        page = new_page(browser, errors)
        log_in(page, rc.url, "bob")
        load_key(page, tmp_path, "bob")
        page.goto(f"{rc.url}/actions/{w.action_id}")
        page.keyboard.press("Tab")
        assert focused(page) == "a:Skip to main content"
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("", "none")  # the focus is visible
        page.keyboard.press("Enter")
        assert focused(page) == "#main"
        for _ in range(40):  # Tab through the page until the first radio of the decision form
            page.keyboard.press("Tab")
            if focused(page) == "input[name=decision][value=approve]":
                break
        else:
            raise AssertionError("the approve radio is not reachable with Tab")
        page.keyboard.press("Space")
        expect(page.get_by_label("Approve")).to_be_checked()
        page.keyboard.press("Tab")
        assert focused(page) == "#comment"
        page.keyboard.type("approved without a mouse")
        page.keyboard.press("Tab")
        assert focused(page).startswith("button:Record decision")
        page.keyboard.press("Enter")
        expect(page.locator(".flash")).to_contain_text("you approved")
    assert not errors, errors


def test_the_browser_signs_and_a_foreign_key_is_refused_in_process(browser, tmp_path):
    """The signing path alone, without the broker: the real console app served by uvicorn, a recording sink in place
    of Kafka. Rita validates and Ada releases a kill switch, each signed in the browser with their own key; a
    validation signed with someone else's key is refused with the reason and nothing is sent."""
    import threading
    import time

    import uvicorn

    from pilothouse.console.auth import LocalAccounts
    from pilothouse.console.config import ConsoleSettings
    from pilothouse.console.domain import ReadModel
    from pilothouse.console.web import Console
    from tests.e2e.console_harness import free_port

    class Sink:
        def __init__(self):
            self.sent = []

        def send(self, record):
            self.sent.append(record)

    w = World()
    model, sink, port = ReadModel(), Sink(), free_port()
    for r in w.upstream():
        model.apply(r)
    registry = write_human_keys(tmp_path)
    settings = ConsoleSettings(users_file=write_users_file(tmp_path), session_secret="t" * 48, port=port,
                               secure_cookies=False, human_keys=registry)
    console = Console(settings, model, sink, LocalAccounts.from_file(settings.users_file))
    server = uvicorn.Server(uvicorn.Config(console.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url, errors = f"http://127.0.0.1:{port}", []
    humans = attestation.HumanKeyRegistry.from_file(registry)
    try:
        page = new_page(browser, errors)
        log_in(page, url, "rita")
        page.locator("#signing-key-file").set_input_files(str(key_file(tmp_path, "ada")))  # the wrong file
        # stored (IndexedDB, asynchronously) before the page is left: a navigation right after the file was chosen
        # could beat the store, and the decision was then refused for having no key, not the wrong one (seen once)
        expect(page.locator("#signing-key-status")).to_contain_text("ready for rita")
        page.goto(f"{url}/incidents/{w.incident_id}")
        card = page.locator(f"#hyp-{w.h1}")
        card.get_by_label("Validate").check()
        card.get_by_role("button", name="Record verdict").click()
        expect(page.get_by_text("not enrolled for rita")).to_be_visible()
        assert sink.sent == []
        page.goto(f"{url}/incidents/{w.incident_id}")
        load_key(page, tmp_path, "rita")
        card = page.locator(f"#hyp-{w.h1}")
        card.get_by_label("Validate").check()
        card.get_by_role("button", name="Record verdict").click()
        expect(page.locator(".flash")).to_contain_text(f"you validated hypothesis {w.h1}")
        assert humans.verify(sink.sent[-1]).signer == "rita" and sink.sent[-1].verdict == "validated"

        admin = new_page(browser, errors)
        log_in(admin, url, "ada")
        load_key(admin, tmp_path, "ada")
        admin.goto(f"{url}/status")
        admin.get_by_label("Release").check()
        admin.get_by_label("Reason").fill("drill over")
        admin.get_by_role("button", name="Change kill switch").click()
        expect(admin.locator(".flash")).to_contain_text("released")
        rec = sink.sent[-1]
        assert (rec.engaged, rec.changed_by) == (False, "ada") and humans.verify(rec).signer == "ada"
    finally:
        server.should_exit = True
        thread.join(10)
    assert not [e for e in errors if "Content Security Policy" in e or "Uncaught" in e], errors
