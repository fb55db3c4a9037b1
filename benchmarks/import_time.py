"""How long ``import bayesq_lightning`` takes, and what the lazy transformers registration saves.

Each measurement is a fresh interpreter (``python -c``), 7 runs, median: the time of
``import torch``, then of ``import bayesq_lightning`` after it, then of what registering with
transformers at import would have cost (``transformers.quantizers`` and its config classes),
and whether ``import bayesq_lightning`` loaded transformers or Lightning. Writes
``benchmarks/results/import_time.{json,csv}``.

Run: ``.venv/bin/python benchmarks/import_time.py`` (about 30 s).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_table  # noqa: E402

PROBE = """
import json, sys, time
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import bayesq_lightning
t2 = time.perf_counter()
loaded = {m: m in sys.modules for m in ("transformers", "lightning")}
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
t3 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "bayesq_s": t2 - t1, "transformers_quantizers_s": t3 - t2,
                  "registered": "bayesq" in AUTO_QUANTIZER_MAPPING, **loaded}))
"""


def main(runs: int = 7) -> list[dict]:
    out = [json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True,
                                     text=True, check=True).stdout) for _ in range(runs)]
    row = {k: statistics.median(r[k] for r in out)
           for k in ("torch_s", "bayesq_s", "transformers_quantizers_s")}
    row.update(runs=runs, imports_transformers=any(r["transformers"] for r in out),
               imports_lightning=any(r["lightning"] for r in out),
               registered_after_transformers=all(r["registered"] for r in out))
    write_table([row], "import_time", list(row))
    return [row]


if __name__ == "__main__":
    main()
