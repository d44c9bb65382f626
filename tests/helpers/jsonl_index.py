"""Index a jsonl file under torch.distributed (gloo) and write what each rank saw, for tests/test_datasets.py.

    torchrun --standalone --nproc_per_node 2 tests/helpers/jsonl_index.py DATA.jsonl OUT_PREFIX  -> OUT_PREFIX.rank0.json ...
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from dataset.jsonl import JsonlFile, check_text

dist.init_process_group("gloo")
rows = JsonlFile(sys.argv[1], check_text, verbose=False)
Path(f"{sys.argv[2]}.rank{dist.get_rank()}.json").write_text(json.dumps(
    {"from_cache": rows.from_cache, "offsets": rows.offsets.tolist(), "bad": rows.bad_lines}))
dist.destroy_process_group()
