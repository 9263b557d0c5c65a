"""The adversarial suite at full size: hostile clients, then fuzzing and faults.

1. **Hostile clients.** A real `modelyard serve` (the built-in engine, small, plus priced
   catalog models on the fault upstream, tests/router/fault_server.py) takes each attack of
   tests/adversarial/attacks.py at full size: a 40 MiB body, 200,000 one-character messages
   from a key with no balance, a body trickling in, n=128 twice, special-token text, hostile
   logit_bias keys, seed -1, a user with a NUL or 300 characters, tool schemas with $defs,
   tool_choice auto without tools, an upstream sending endless SSE comments, another
   account's prompt probed through cached_tokens. For each: the status answered, how long
   it took, the server's CPU seconds and peak resident-memory rise while it ran (from
   /proc/PID), the slowest /health answer meanwhile, and whether the answer is the right one.
2. **Fuzz, crash, backing services** (unless `--attacks-only`): the suite's tests in
   tests/adversarial with MODELYARD_ADVERSARIAL_LONG=1 (more examples, more requests, longer
   outages), which report their figures: requests fuzzed, 5xx seen, faults injected, money
   unaccounted for. They need PostgreSQL and Redis (tests/platform/services.py).

    .venv/bin/python benchmarks/adversarial.py
    .venv/bin/python benchmarks/adversarial.py --attacks-only --only slowloris_body

Prints markdown tables and writes the results as JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine, resolve_default_model, save_results  # noqa: E402

from tests.adversarial.attacks import ATTACKS, hostile_config, make_target  # noqa: E402
from tests.adversarial.harness import FIGURES_ENV, HealthWatch, measured  # noqa: E402
from tests.adversarial.ledger_invariant import wait_for_ledger  # noqa: E402
from tests.e2e.server import running_server  # noqa: E402
from tests.router.fault_process import running_fault_server  # noqa: E402

SUITE = ["tests/adversarial/test_fuzz.py", "tests/adversarial/test_crash.py",
         "tests/adversarial/test_backing_services.py"]


def run_attacks(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    chosen = [a for a in ATTACKS if not args.only or a.run.__name__ in args.only]
    with tempfile.TemporaryDirectory() as tmp, running_fault_server() as fault, \
            running_server(args.data_dir, hostile_config(fault), Path(tmp)) as server:
        target = make_target(server)
        print("| attack | expected | answered | time | server CPU | peak RSS rise | "
              "slowest /health | ok |\n|---|---|---|---:|---:|---:|---:|---|", flush=True)
        for attack in chosen:
            with HealthWatch(server.base_url, timeout_s=30) as health, \
                    measured(server.process.pid) as cost:
                answer = attack.run(target, True)
            row = {"attack": attack.name, "function": attack.run.__name__,
                   "expected": attack.expected, "status": answer.status,
                   "seconds": round(answer.seconds, 3), "cpu_s": round(cost.cpu_s, 3),
                   "peak_rss_delta_mib": round(cost.peak_rss_delta / 2**20, 1),
                   "health_slowest_s": round(health.slowest_s, 3),
                   "health_failures": health.failures, "ok": answer.ok, "note": answer.note}
            rows.append(row)
            answered = "none" if answer.status is None else str(answer.status)
            print(f"| {attack.name} | {attack.expected} | {answered} ({answer.note[:60]}) | "
                  f"{answer.seconds:.2f} s | {cost.cpu_s:.2f} s | "
                  f"{row['peak_rss_delta_mib']} MiB | {health.slowest_s:.2f} s | "
                  f"{'yes' if answer.ok else 'NO'} |", flush=True)
        ledger = wait_for_ledger(f"sqlite:///{Path(tmp) / 'platform.db'}", wait_s=15)
        print(f"\nledger after the attacks: {len(ledger.violations)} violation(s), "
              f"{ledger.money_unaccounted} micro-units unaccounted for", flush=True)
        rows.append({"attack": "ledger afterwards", "violations": ledger.violations,
                     "money_unaccounted": ledger.money_unaccounted})
    return rows


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        figures_file = Path(tmp) / "figures.json"
        env = dict(os.environ, MODELYARD_ADVERSARIAL_LONG="1",
                   **{FIGURES_ENV: str(figures_file)},
                   MODELYARD_TEST_DATA_DIR=str(args.data_dir))
        done = subprocess.run([sys.executable, "-m", "pytest", *SUITE, "-q", "-p",
                               "no:cacheprovider"], cwd=ROOT, env=env, check=False)
        figures: dict[str, Any] = orjson.loads(figures_file.read_bytes()) \
            if figures_file.exists() else {}
    figures["suite_passed"] = done.returncode == 0
    print("\n| figure | value |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name.replace('_', ' ')} | {value} |")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="attack function names to run")
    parser.add_argument("--attacks-only", action="store_true",
                        help="skip the fuzz, crash and backing-service tests")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model-path", type=Path, default=None)
    args = parser.parse_args()
    resolve_default_model(args)
    print(f"machine: {machine('modelyard', 'llama-cpp-python')}\n", flush=True)
    results: dict[str, Any] = {"machine": machine("modelyard", "llama-cpp-python"),
                               "attacks": run_attacks(args)}
    if not args.attacks_only:
        results["suite"] = run_suite(args)
    save_results("adversarial", results, args)


if __name__ == "__main__":
    main()
