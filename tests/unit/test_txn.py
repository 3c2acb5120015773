"""Transactions without a kernel: snapshots of the state files, arming and disarming, recovery.

The firewall half of restore() runs against real kernels in tests/kernel
(test_confirm_rollback.py, test_faults.py); here the parts that need none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostprep import plan as planmod
from hostprep import render, snapshot, status, timers, txn
from hostprep.errors import InputError, RefusedError, StateError
from hostprep.model import Policy
from hostprep.paths import Paths
from hostprep.state import Store
from tests.helpers import FakeKernel, waiting_change



@pytest.fixture
def FakeRunner(fake_runner):
    return fake_runner


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(Paths(tmp_path))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def seed(store: Store) -> dict[Path, str]:
    files = {store.paths.settings_file: '{"interface": "eth1"}\n',
             store.paths.state_file: '{"time": "t0"}\n',
             store.containers_dir / "finesse.json": '{"name": "finesse"}\n'}
    for p, t in files.items():
        write(p, t)
    return files


def test_confirm_seconds_bounds():
    assert timers.confirm_seconds(None) is None
    assert timers.confirm_seconds(120) == 120
    for bad in (0, -5, 86401):
        with pytest.raises(InputError) as exc:
            timers.confirm_seconds(bad)
        assert exc.value.field == "--confirm"


@pytest.mark.parametrize("name,members,family", [
    ("hostprep-abcd1234-lb4", ["192.0.2.0/24"], 4),
    ("hostprep-abcd1234-ex6", ["2001:db8::/64"], 6),
    ("hostprep-abcd1234-ex6", [], 6),
    ("hostprep-abcd1234-lb4-n", [], 4),
    ("hostprep-abcd1234-ex6-n", [], 6),
])
def test_set_family_from_name_or_members(name, members, family):
    assert snapshot.set_family(name, members) == family


def test_snapshot_of_the_firewall_round_trips_to_the_same_rulesets(store):
    desired = render.desired(Policy("eth1"))
    # the temporary NAME-n set of an interrupted swap is in the kernel too
    be = FakeKernel.holding(desired, sets={"hostprep-abcd1234-lb4": frozenset({"192.0.2.0/24"}),
                                           "hostprep-abcd1234-lb4-n": frozenset()})
    snap = snapshot.take(be, store, firewall=True, kernel=False, command="hostprep apply -i eth1")
    target = snapshot.snapshot_target(snapshot.Snapshot.from_dict(json.loads(json.dumps(snap.to_dict()))))
    for fam in (4, 6):
        assert target.ruleset(fam) == planmod.ruleset_from_observed(be.observed[fam])
        assert target.ruleset(fam).rule_count == desired.ruleset(fam).rule_count
    # the temporary NAME-n set of an interrupted swap is not part of the state
    assert [(s.name, s.family, [str(m) for m in s.members]) for s in target.sets] == \
        [("hostprep-abcd1234-lb4", 4, ["192.0.2.0/24"])]
    assert target.nft is None and snap.backend == "nft"


def test_restore_puts_back_the_state_files_and_drops_added_container_records(store):
    before = seed(store)
    snap = snapshot.take(None, store, firewall=False, kernel=False)
    write(store.paths.settings_file, '{"interface": "eth9"}\n')
    store.paths.state_file.unlink()
    write(store.containers_dir / "ids.json", '{"name": "ids"}\n')
    notes = snapshot.restore(None, store, snap)
    assert {p: p.read_text() for p in before} == before
    assert not (store.containers_dir / "ids.json").exists()
    assert sorted(notes) == sorted(["etc/hostprep/settings.json restored", "var/lib/hostprep/applied.json restored",
                                    "var/lib/hostprep/containers/ids.json restored"])
    assert snapshot.restore(None, store, snap) == []          # idempotent


def test_a_failing_change_restores_the_files_and_leaves_no_marker(store):
    before = seed(store)
    with pytest.raises(StateError):
        with txn.change(None, store, "hostprep test", firewall=False) as ch:
            assert txn.inflight_file(store).is_file()
            assert snapshot.snapshot_file(store, ch.id).is_file()
            write(store.paths.settings_file, '{"interface": "eth9"}\n')
            raise StateError("applied.json", "cannot write (No space left on device)")
    assert {p: p.read_text() for p in before} == before
    assert not txn.inflight_file(store).exists()
    assert list(snapshot.rollback_dir(store).glob("*.json")) == []
    journal = store.paths.journal.read_text().splitlines()
    assert len(journal) == 1 and "the state before it is restored" in journal[0]


def test_the_problem_of_the_error_says_the_host_was_brought_back(store):
    seed(store)
    with pytest.raises(StateError) as exc:
        with txn.change(None, store, "hostprep test", firewall=False):
            write(store.paths.settings_file, "{}\n")
            raise StateError("applied.json", "cannot write (Read-only file system)", "check the disk")
    assert exc.value.line() == ("applied.json: cannot write (Read-only file system); the host was brought back "
                                "to the recorded state before this change (check the disk)")


def test_a_successful_change_is_what_rollback_restores(store, FakeRunner):
    before = seed(store)
    with txn.change(None, store, "hostprep first", firewall=False) as ch:
        write(store.paths.settings_file, '{"interface": "eth2"}\n')
    assert snapshot.last_file(store).read_text() == ch.id + "\n"
    assert not txn.inflight_file(store).exists()
    res = txn.rollback(None, store, FakeRunner(), "hostprep rollback")
    assert res.id == ch.id and res.notes == ["etc/hostprep/settings.json restored"]
    assert {p: p.read_text() for p in before} == before
    with pytest.raises(InputError) as exc:
        txn.rollback(None, store, FakeRunner(), "hostprep rollback")
    assert "nothing to roll back" in exc.value.problem


def test_an_unchanged_change_keeps_the_earlier_snapshot(store):
    seed(store)
    with txn.change(None, store, "hostprep first", firewall=False) as first:
        write(store.paths.settings_file, '{"interface": "eth2"}\n')
    with txn.change(None, store, "hostprep again", firewall=False) as second:
        second.changed = False
    assert snapshot.last_file(store).read_text() == first.id + "\n"
    assert [p.stem for p in snapshot.rollback_dir(store).glob("*.json")] == [first.id]


def test_a_change_inside_a_change_is_refused_without_a_second_snapshot(store):
    """Changes do not nest (the code inside one is handed it): a second one is a programming
    error, refused before any lock or snapshot; the outer change goes on."""
    seed(store)
    with txn.change(None, store, "outer", firewall=False) as outer:
        with pytest.raises(RuntimeError, match=r"a change \(outer\) is open already"):
            with txn.change(None, store, "inner", firewall=False):
                pass
        assert outer is not None
    assert len(list(snapshot.rollback_dir(store).glob("*.json"))) == 1


def test_an_interrupted_change_is_recovered_by_the_next_one(store, FakeRunner):
    before = seed(store)
    snap = snapshot.take(None, store, firewall=False, kernel=False, command="hostprep killed")
    txn.save_snapshot(store, "20260101T000000-1", snap)
    write(txn.inflight_file(store), json.dumps({"id": "20260101T000000-1", "pid": 1, "command": "hostprep killed"}))
    write(store.paths.settings_file, '{"interface": "half"}\n')
    tx = status.transaction_section(None, store, FakeRunner())
    report, problems = tx.report, tx.problems
    assert report["interrupted"]["running"] is False and report["interrupted"]["id"] == "20260101T000000-1"
    assert len(problems) == 1 and "was interrupted" in problems[0]
    with txn.change(None, store, "hostprep next", firewall=False) as ch:
        assert ch.recovered == ["change 20260101T000000-1 (hostprep killed) was interrupted (PID 1); the state "
                                "before it is restored (1 items)"]
        assert {p: p.read_text() for p in before} == before
    assert "recover (by hostprep next)" in store.paths.journal.read_text()


def test_a_missing_snapshot_of_an_interrupted_change_is_reported_not_fatal(store):
    seed(store)
    write(txn.inflight_file(store), json.dumps({"id": "nope", "pid": 1, "command": "x"}))
    with store.lock():
        assert txn.recover(None, store) == ["interrupted change nope: no snapshot; marker removed"]
    assert not txn.inflight_file(store).exists()


def test_timer_mechanism_override_and_sandbox(store, monkeypatch):
    monkeypatch.setenv("HOSTPREP_CONFIRM_TIMER", "systemd")
    assert timers.timer_mechanism(store) == "systemd"
    monkeypatch.setenv("HOSTPREP_CONFIRM_TIMER", "cron")
    with pytest.raises(InputError):
        timers.timer_mechanism(store)
    monkeypatch.delenv("HOSTPREP_CONFIRM_TIMER")
    # under a test root (not "/") the rollback must stay in this namespace: never systemd-run
    assert timers.timer_mechanism(store) == "process"


def test_arming_with_systemd_runs_a_transient_timer_and_confirm_stops_it(store, monkeypatch, FakeRunner):
    monkeypatch.setenv("HOSTPREP_CONFIRM_TIMER", "systemd")
    monkeypatch.setenv("HOSTPREP_ROOT", str(store.paths.root))
    runner = FakeRunner(replies={("systemctl", "is-active", "hostprep-rollback-ID1.timer"): (0, "active\n", "")})
    p = timers.arm(store, runner, "ID1", 120, "hostprep apply -i eth1 --confirm 120")
    argv = runner.calls[0][0]
    assert argv[:6] == ["systemd-run", "--unit=hostprep-rollback-ID1",
                        "--description=hostprep: roll back unconfirmed change ID1", "--on-active=120s",
                        "--timer-property=AccuracySec=1s", "--collect"]
    assert f"--setenv=HOSTPREP_ROOT={store.paths.root}" in argv
    # -P: the rollback never imports a hostprep/ from the directory apply ran in (issue 10, item 2)
    assert argv[-7:] == [sys.executable, "-P", "-m", "hostprep", "rollback", "--due", "ID1"]
    assert runner.calls[0][2] is True                      # a mutating call (not run by --dry-run)
    assert json.loads(timers.pending_file(store).read_text()) == p.to_dict()
    assert p.unit == "hostprep-rollback-ID1.timer" and p.mechanism == "systemd"
    assert 119 <= p.deadline - time.time() <= 120
    assert timers.timer_alive(runner, p) is True
    res = txn.confirm(store, runner)
    assert res.id == "ID1" and res.late is False
    assert runner.calls[-1][0] == ["systemctl", "stop", "hostprep-rollback-ID1.timer"]
    assert not timers.pending_file(store).exists()
    assert "change ID1 (hostprep apply -i eth1 --confirm 120) confirmed" in store.paths.journal.read_text()


def test_a_pending_change_refuses_the_next_one(store, monkeypatch):
    seed(store)
    write(timers.pending_file(store), json.dumps({"id": "P1", "command": "hostprep apply --confirm 60",
                                               "deadline": time.time() + 60, "deadline_text": "soon",
                                               "mechanism": "process", "watcher_pid": None}))
    with pytest.raises(RefusedError) as exc:
        with txn.change(None, store, "hostprep apply", firewall=False):
            pytest.fail("must not run")
    assert exc.value.fix == "run 'hostprep confirm' to keep it or 'hostprep rollback' to undo it first"
    assert not txn.inflight_file(store).exists()


def test_confirm_without_a_pending_change_is_one_clear_error(store, FakeRunner):
    with pytest.raises(InputError) as exc:
        txn.confirm(store, FakeRunner())
    assert exc.value.line() == "confirm: no change waits for confirmation (see 'hostprep status')"


def test_the_watcher_sleeps_until_the_deadline_and_stops_when_confirmed(store):
    def armed(cid, seconds):
        write(timers.pending_file(store), json.dumps({"id": cid, "command": "c", "deadline": time.time() + seconds,
                                                   "deadline_text": "t"}))
    armed("W1", 0.4)
    t0 = time.monotonic()
    assert timers.wait_until_due(store, "W1") is True
    assert time.monotonic() - t0 >= 0.35
    armed("W2", 30)
    assert timers.wait_until_due(store, "W1") is False       # another change is pending: not ours


def test_the_watcher_process_outlives_its_parent_session_and_exits_on_confirm(store, monkeypatch, FakeRunner):
    """The process mechanism: own session (no terminal to hang up), gone once confirmed."""
    monkeypatch.setenv("HOSTPREP_CONFIRM_TIMER", "process")
    monkeypatch.setenv("HOSTPREP_ROOT", str(store.paths.root))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    p = timers.arm(store, FakeRunner(), "W3", 600, "hostprep test")
    pid = p.watcher_pid
    try:
        assert os.getsid(pid) == pid                      # a session leader: SIGHUP of ours never reaches it
        deadline = time.time() + 10
        while not timers._watcher_alive(pid, "W3") and time.time() < deadline:
            time.sleep(0.05)
        assert timers.timer_alive(FakeRunner(), p) is True
        timers.disarm(store, FakeRunner(), p)
        deadline = time.time() + 10
        while timers._watcher_alive(pid, "W3") and time.time() < deadline:
            time.sleep(0.05)
        assert timers._watcher_alive(pid, "W3") is False
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_status_section_shows_the_pending_deadline(store, FakeRunner):
    write(timers.pending_file(store), json.dumps({"id": "S1", "command": "hostprep apply --confirm 60",
                                               "deadline": time.time() + 59.5, "deadline_text": "12:00:00",
                                               "mechanism": "process", "watcher_pid": 999999999}))
    tx = status.transaction_section(None, store, FakeRunner())
    report, problems = tx.report, tx.problems
    assert report["pending"]["seconds_left"] in (58, 59)
    assert report["pending"]["timer_alive"] is False
    assert problems[0].startswith("change S1 (hostprep apply --confirm 60) waits for 'hostprep confirm' until 12:00:00")
    assert problems[1] == ("the rollback timer of change S1 is not running (process): run 'hostprep confirm' "
                           "or 'hostprep rollback'")


def test_snapshot_of_a_read_only_state_dir_fails_before_any_change(store, monkeypatch):
    seed(store)
    calls = []

    def boom(*a, **k):
        raise StateError("rollback", "cannot write (Read-only file system)")
    monkeypatch.setattr(txn, "save_snapshot", boom)
    with pytest.raises(StateError):
        with txn.change(None, store, "hostprep apply", firewall=False):
            calls.append("ran")
    assert calls == []
    assert not txn.inflight_file(store).exists()


def test_cli_confirm_option_is_bounded():
    res = subprocess.run([sys.executable, "-m", "hostprep", "apply", "-i", "eth1", "--dry-run", "--confirm", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "--confirm" in res.stderr


# -- review fixes: rollbacks killed half-way, late confirms, failed arming, signals --------------------

def test_a_rollback_killed_half_way_is_finished_and_confirm_refuses(store, FakeRunner):
    before = seed(store)
    change_id = waiting_change(store, "hostprep apply --confirm 60", seconds=60, deadline_text="soon")
    # what rollback() writes before it restores; the process then died
    write(txn.inflight_file(store), json.dumps({"id": change_id, "kind": "rollback", "pid": 1,
                                                "command": "hostprep apply --confirm 60"}))
    with pytest.raises(RefusedError) as exc:
        txn.confirm(store, FakeRunner())
    assert exc.value.problem == (f"change {change_id} (hostprep apply --confirm 60) was being rolled back (PID 1) when "
                                 "that was interrupted; the rollback is finished (1 items); nothing is left to confirm")
    assert {p: p.read_text() for p in before} == before
    assert (timers.pending_file(store).exists(), txn.inflight_file(store).exists(), snapshot.last_file(store).exists()) \
        == (False, False, False)


def test_confirm_after_the_rollback_says_when_and_why(store, FakeRunner):
    seed(store)
    change_id = waiting_change(store, "hostprep apply --confirm 1", seconds=-1, deadline_text="then")
    txn.rollback(None, store, FakeRunner(), "hostprep rollback (deadline)", due=change_id)
    with pytest.raises(InputError) as exc:
        txn.confirm(store, FakeRunner())
    assert exc.value.problem.startswith(f"no change waits for confirmation: change {change_id} (hostprep apply "
                                        "--confirm 1) was rolled back at ")
    assert exc.value.problem.endswith("(deadline passed without 'hostprep confirm')")


def test_status_says_the_last_change_was_rolled_back_until_the_next_change(store, FakeRunner):
    """A session lost during --confirm: the next session's status tells what the timer did
    (found by the Vagrant bed: status said nothing of it)."""
    seed(store)
    assert status.transaction_section(None, store, FakeRunner()).report["rolled_back"] is None
    change_id = waiting_change(store, "hostprep apply --confirm 1", seconds=-1, deadline_text="then")
    txn.rollback(None, store, FakeRunner(), "hostprep rollback (deadline)", due=change_id)
    tx = status.transaction_section(None, store, FakeRunner())
    report, problems = tx.report, tx.problems
    gone = report["rolled_back"]
    assert (gone["id"], gone["command"], gone["why"], problems) == (
        change_id, "hostprep apply --confirm 1", "deadline passed without 'hostprep confirm'", [])
    with txn.change(None, store, "hostprep apply", firewall=False):
        pass
    assert status.transaction_section(None, store, FakeRunner()).report["rolled_back"] is None


def test_a_failed_arming_leaves_no_pending_change_behind(store, monkeypatch):
    seed(store)
    monkeypatch.setenv("HOSTPREP_CONFIRM_TIMER", "process")

    def no_fork(*a, **k):
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(subprocess, "Popen", no_fork)
    with pytest.raises(OSError):
        with txn.change(None, store, "hostprep apply --confirm 60", firewall=False, confirm=60):
            pytest.fail("the change must not run without its rollback armed")
    assert (timers.pending_file(store).exists(), txn.inflight_file(store).exists()) == (False, False)
    with txn.change(None, store, "hostprep apply", firewall=False):   # the next change is not refused
        pass
    assert "nothing had changed" in store.paths.journal.read_text()


def test_a_malformed_pending_record_is_one_clear_line(store):
    write(timers.pending_file(store), '{"id": "x"}')
    with pytest.raises(StateError) as exc:
        timers.pending(store)
    assert exc.value.line() == (f"{timers.pending_file(store)}: malformed record of a change waiting for confirmation "
                                "(run 'hostprep rollback' if its snapshot exists, else remove the file)")


def test_hangup_and_terminate_wait_until_the_change_is_whole(store):
    import signal
    seed(store)
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        with txn.change(None, store, "hostprep apply", firewall=False):
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []                                  # deferred: the change goes on
            write(store.paths.settings_file, '{"interface": "eth2"}\n')
        assert got == [signal.SIGHUP, signal.SIGTERM]         # delivered once the change was recorded
        assert not txn.inflight_file(store).exists()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_apply_d_takes_no_confirm():
    res = subprocess.run([sys.executable, "-m", "hostprep", "apply", "-d", "--confirm", "30"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: -d/--disable: -d removes the firewall rules only; it takes no -k, -p or --confirm (run 'hostprep "
        "apply -d' alone ('hostprep flush --kernel' restores the kernel values))"]
