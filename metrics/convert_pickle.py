"""The one place that reads a pickle: a one-time conversion of a metric's weights that exist only as a PyTorch pickle
(HPSv2.1's `HPS_v2.1_compressed.pt`) to safetensors, with `torch.load(weights_only=True)` (tensors and plain
containers only: no code runs). Everything else in the project reads safetensors alone.

    python -m metrics.convert_pickle HPS_v2.1_compressed.pt hps_v2.1.safetensors
"""
import sys

import torch

from weights import save_atomic


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m metrics.convert_pickle IN.pt OUT.safetensors", file=sys.stderr)
        return 2
    try:
        data = torch.load(argv[0], map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs more than tensors and containers, or no pickle at all
        print(f"error: {argv[0]}: not loadable with weights_only=True ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        print(f"error: {argv[0]}: holds no state dict of tensors", file=sys.stderr)
        return 1
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    save_atomic(state, argv[1])
    print(f"wrote {argv[1]}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
