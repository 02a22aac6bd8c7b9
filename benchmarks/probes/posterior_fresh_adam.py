"""Probe (issue 38): posterior_phase.py with the posterior groups' Adam moments dropped where the posterior phase
starts (as examples/svi_script.py's fresh optimiser does), by patching the trainer in this process only.

    python benchmarks/probes/posterior_fresh_adam.py      # compare: python benchmarks/probes/posterior_phase.py --epochs 0.5 --set posterior_epochs=0.25
"""
import runpy
import sys
from pathlib import Path

from sqs_pyro.infer import trainer as T

orig = T.Trainer._apply_schedule


def patched(self, step, eval_fn):
    if step == self.schedule.total_steps and self.schedule.phase(step) == T.POSTERIOR:
        for group in self.optimizer.param_groups:
            if group["name"] in T.POSTERIOR_GROUPS:
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
        print("posterior groups' optimiser state dropped", flush=True)
    return orig(self, step, eval_fn)


T.Trainer._apply_schedule = patched
sys.argv = ["posterior_phase.py", "--epochs", "0.5", "--set", "posterior_epochs=0.25", *sys.argv[1:]]  # e.g. --seed 1
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
runpy.run_path(str(HERE / "posterior_phase.py"), run_name="__main__")
