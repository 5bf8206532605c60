"""``python -m pipeline.bench CASE PARAMS_JSON``: one case in this fresh process (see harness.run_case)."""
import sys

from pipeline.bench.harness import main

main(sys.argv[1:])
