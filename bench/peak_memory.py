"""`preftune train` (arguments as for the CLI) that also prints, per process, the engine's wrapper of decoder layer 0
and the peak memory: `torch.cuda.max_memory_allocated` on a GPU, peak RSS on a CPU. Used by scale_gpu_check.sh;
KILL_AFTER=N kills every process right after metrics line N (to test resuming).

    python bench/peak_memory.py train --model M --data D --output-dir OUT ...
    accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml bench/peak_memory.py train ...
"""

from __future__ import annotations

import os
import resource
import signal
import sys

import torch

from preftune.callbacks import Callback
from preftune.cli import main


class Probe(Callback):
    def on_train_begin(self, state):
        lm = getattr(state.model, "get_base_model", lambda: state.model)()
        layer = lm.model.layers[0]
        weight = next(layer.parameters())
        print(f"WRAPPER rank {os.environ.get('RANK', '0')} {type(layer).__name__} {type(weight).__name__}",
              flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the training peak, not the loading one

    def on_log(self, state, row):
        if row["split"] == "train" and row["step"] >= int(os.environ.get("KILL_AFTER", "1000000000")):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, state):
        rank = os.environ.get("RANK", "0")
        if torch.cuda.is_available():
            print(f"PEAK rank {rank} {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated "
                  f"{torch.cuda.max_memory_reserved() / 2**20:.0f} MiB reserved", flush=True)
        else:
            print(f"PEAK rank {rank} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS",
                  flush=True)


sys.exit(main(sys.argv[1:], callbacks=[Probe()]))
