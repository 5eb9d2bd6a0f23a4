"""Writes what the C++ serving example (serve_aoti.cpp) serves, for its ctest: a small
BiLSTM classifier of the zoo (random weights) exported by seqfuse's export stage with
--formats aoti (parity proven there first), and the inputs with the eager model's
outputs, saved by torch.save.

    python csrc/examples/make_aoti_package.py OUT_DIR
      OUT_DIR/artifact/model.aoti.pt2, OUT_DIR/inputs.pt
"""
import sys
from pathlib import Path

import torch

from seqfuse.export import export_model
from seqfuse.zoo.models import MODELS


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = MODELS["lstm-classifier"](vocab_size=500, embed_dim=32, hidden_size=64,
                                      num_classes=3, bidirectional=True).eval()
    export_model(model, None, out / "artifact", formats=("aoti",), model_name="lstm-classifier",
                 progress=False)
    ids = torch.randint(1, 500, (3, 11))
    lengths = torch.tensor([11, 4, 1])
    with torch.no_grad():
        expected = [model(ids, lengths)]
    torch.save(([ids, lengths], expected), out / "inputs.pt")
    print(f"wrote {out / 'artifact' / 'model.aoti.pt2'} and {out / 'inputs.pt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
