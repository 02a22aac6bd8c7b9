"""Several ``benchmarks/minilm.py`` settings x seeds as parallel processes, rows collected in one JSONL.

    python benchmarks/minilm_sweep.py --configs benchmarks/configs/minilm_sweep_lamp.json --seeds 0 1 2 \\
        --parallel 6 --deadline 470 --out benchmarks/results/minilm_gpu_lamp.jsonl -- --device cuda

``--configs`` maps a name to the arguments of ``minilm.py`` (besides ``--seed`` and ``--out``); the
arguments after ``--`` are added to every run. ``--smoke``: one run of ``minilm.py --smoke`` in a temporary
folder (CI). Each run works in its own folder under ``--work``, so
its dense fine-tuning cache and SQS checkpoint are its own (``--cache-dir``). Runs still going at ``--deadline`` seconds
are stopped; their logs' tails are kept. Each row gets ``config`` (the name) and ``command`` (the
arguments of its run), and one line per run goes to stdout: name, seed, seconds, validation and test
drops (points). Meant for an accelerator, where one process leaves most of the device idle.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from smoke import add_smoke_flag, smoke_folder

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, help="JSON: {name: [minilm.py arguments]} (required but with --smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="processes at a time")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="stop runs still going after S seconds")
    parser.add_argument("--work", type=Path, default=Path("runs/minilm_sweep"))
    parser.add_argument("--out", type=Path, help="JSON lines, one per finished run (required but with --smoke)")
    parser.add_argument("common", nargs="*", help="arguments for every run (after --)")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        folder = smoke_folder()
        (folder / "configs.json").write_text(json.dumps({"smoke": ["--smoke", "--mode", "hard"]}))
        args.configs, args.seeds, args.work, args.out = folder / "configs.json", [0], folder / "work", folder / "sweep.jsonl"
    elif args.configs is None or args.out is None:
        parser.error("--configs and --out are required (but with --smoke)")
    configs = json.loads(args.configs.read_text())
    if not configs:
        parser.error(f"{args.configs} names no setting")
    queue = [(name, seed) for seed in args.seeds for name in configs]
    started, running, done = time.perf_counter(), {}, []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    while queue or running:
        while queue and len(running) < args.parallel:
            name, seed = queue.pop(0)
            work = (args.work / f"{name}_seed{seed}").resolve()
            work.mkdir(parents=True, exist_ok=True)
            command = [*configs[name], *args.common, "--seed", str(seed), "--out", str(work / "row.json"),
                       "--cache-dir", str(work)]
            log = (work / "log.txt").open("w")
            proc = subprocess.Popen([sys.executable, str(HERE / "minilm.py"), *command], stdout=log,
                                    stderr=subprocess.STDOUT)
            running[(name, seed)] = (proc, work, command, time.perf_counter())
        time.sleep(2)
        late = time.perf_counter() - started > args.deadline
        for key, (proc, work, command, t0) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            del running[key]
            seconds = time.perf_counter() - t0
            row_file = work / "row.json"
            if proc.returncode == 0 and row_file.exists():
                row = {"config": key[0], "command": command, "seconds": seconds, **json.loads(row_file.read_text())}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                drop = lambda d, g: 100 * (row[d] - row[g]) if d in row else float("nan")  # noqa: E731
                print(f"{key[0]} seed {key[1]}: {seconds:.0f} s, drop val {drop('accuracy_val_dense', 'accuracy_val_greedy'):.2f}"
                      f" / test {drop('accuracy_dense', 'accuracy_greedy'):.2f}", flush=True)
            else:
                tail = (work / "log.txt").read_text(errors="replace")[-1500:]
                print(f"{key[0]} seed {key[1]}: FAILED (rc {proc.returncode}, {seconds:.0f} s)\n{tail}", flush=True)
            done.append(key)
        if late:
            queue.clear()
    print(f"{len(done)} runs in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
