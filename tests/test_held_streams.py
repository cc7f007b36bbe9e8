"""bench/held_streams.py's rig: pinning puts the server and the rig on separate CPUs, and a small run of it
end to end (a real gateway, upstream, holders and probe) holds every stream and loses no call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import held_streams

ROOT = Path(__file__).resolve().parent.parent


def test_a_pinned_child_runs_on_the_cpus_it_was_given() -> None:
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=held_streams._in_child({cpu}),
    )
    assert json.loads(out.stdout) == [cpu]


def test_the_plan_gives_the_server_one_cpu_and_the_rig_the_others() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    auto = held_streams.pin_plan(None)
    if len(cpus) >= 2:
        assert auto == {"server": cpus[:1], "rig": cpus[1:]}
    else:
        assert auto is None  # nothing to split: measured unpinned rather than not at all
    assert held_streams.pin_plan(False) is None


def test_rss_by_kind_accounts_for_the_whole_rss() -> None:
    kinds = held_streams.rss_by_kind(os.getpid())
    assert set(kinds) == {"heap", "thread_arenas", "anon", "files"}
    assert kinds["files"] > 0 and kinds["anon"] > 0
    assert abs(sum(kinds.values()) - held_streams.rss_mb(os.getpid())) < 2.0  # MB: this process is idle


def test_a_small_run_holds_every_stream_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = ["--streams", "20", "--chunks", "20", "--interval", "0.1", "--ramp", "0.5", "--settle", "1"]
    args += ["--probe-every", "0.2", "--max-loop-lag-ms", "0", "--max-in-flight", "0", "--json", str(out)]
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "held_streams.py"), *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    assert result["held_ok"] == 20 and result["lost"] == 0 and result["shed"] == 0
    assert result["ledger_rows"] == sum(result["statuses"].values())  # a row for every call a client saw end
    assert result["messages"] >= 20 * 20  # every chunk of every stream reached its holder
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert result["cpus"] == {"server": cpus[:1], "rig": cpus[1:]}
        assert result["rig_cores_all_open"] is not None and result["server_cpus_taken_by_others"] is not None
    assert abs(result["rss_kept_mb"] - (result["rss_after_mb"] - result["rss_idle_mb"])) <= 0.11
    assert len(result["rss_after_trace_mb"]) == 1
    # Every probe's TTFT is split where the gateway started the call (its ledger row): both parts are
    # there, neither is negative (one clock), and neither is longer than the longest whole.
    wait, rest = result["probe_wait_to_start_ms_p50"], result["probe_start_to_token_ms_p50"]
    assert wait is not None and rest is not None and wait >= 0 and rest >= 0
    assert wait <= result["ttft_max_ms"] and rest <= result["ttft_max_ms"]
    # The gateway is scraped once, after the load: its own probes come from its histogram of every one.
    assert result["self_probes"] >= 1 and 0 <= result["self_probes_over_100ms"] <= result["self_probes"]
