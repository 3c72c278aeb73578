"""`lens-steer demo`: the main job on the embedded default model.

Until the full study lands, a smoke run: load the shipped toy reasoner (or a random tiny model
when it is absent) on both backends, capture residuals and generate with and without steering.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the shipped toy reasoner")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lens_steer import GenerationConfig, Intervention, NewestPosition, load_model
    from lens_steer.toy import TOY_MODEL_DIR

    source: str | Path = "toy"
    if not (TOY_MODEL_DIR / "config.json").exists():
        from lens_steer.testing import build_tiny_model

        source = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        print(f"[demo] toy model not shipped yet; using a random tiny model at {source}")
    prompt = "Question: Tom has 3 apples and buys 4 more. How many apples?\n<think>\n"
    for backend in ("transformer_lens", "nnsight"):
        model = load_model(source, backend=backend)
        ids = model.encode(prompt)
        acts = model.capture_resid([ids], list(range(model.n_layers)), [[len(ids) - 1]])
        cfg = GenerationConfig(max_new_tokens=48)
        base = model.generate([prompt], cfg)
        vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
        steered = model.generate([prompt], cfg, [Intervention(model.n_layers // 2, 4 * vec,
                                                              NewestPosition())])
        print(f"[demo] {backend}: {model.n_layers} layers, d_model {model.d_model}, "
              f"resid norms {[round(float(a.norm()), 1) for a in acts.values()]}")
        print(f"[demo]   base:    {base.texts[0]!r}")
        print(f"[demo]   steered: {steered.texts[0]!r} ({len(steered.steered)} sites steered)")
    return 0
