"""Train the synthetic-VQA LLaVA that edge-prune measures pruning quality against.

    python examples/train_benchmark_model.py            # the published model (~90 min, 2 CPU cores)
    python examples/train_benchmark_model.py --smoke    # a tiny model in seconds

Same options as `edge-prune bench train`; the model lands in benchmarks/models/toyvqa-llava/.
"""

import sys

from edge_prune.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
