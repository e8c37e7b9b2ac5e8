"""A two-source mixture on tiny inputs (data.mix), for the mixture tests: 'web', JSON lines of
prose-like text, and 'code', Python files, both cut from the standard library's sources, each
~120 kB, prepared with one 384-piece tokenizer in well under a second."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from harness.config import load_config


def write_sources(root: Path) -> tuple[Path, Path]:
    """root/web/docs.jsonl and root/code/*.py; returns the two directories."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    web, code = root / "web", root / "code"
    web.mkdir(parents=True)
    code.mkdir()
    size = 0
    for i, path in enumerate(files[:40]):
        text = path.read_text(errors="replace").encode("ascii", "ignore").decode()[:6000]
        size += len(text)
        (code / f"{i:02d}.py").write_text(text)
        if size > 120_000:
            break
    with open(web / "docs.jsonl", "w") as f:
        size = 0
        for path in files[40:120]:
            text = path.read_text(errors="replace").encode("ascii", "ignore").decode()
            for k in range(0, min(len(text), 6000), 1500):
                doc = "Note. " + text[k:k + 1500].replace("def ", "the ").replace("_", " ")
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc)
            if size > 120_000:
                break
    return web, code


def mix_override(web: Path, code: Path, w_web: float = 0.7, w_code: float = 0.3,
                 extra: str = "") -> str:
    return (f"data.mix=[{{name: web, sources: [{web}], weight: {w_web}}}, "
            f"{{name: code, sources: [{code}], weight: {w_code}{extra}}}]")


def mix_cfg(root: Path, *overrides: str, **weights):
    """The tiny preset on the mix of root (write_sources done), shards in root/out."""
    return load_config("tiny", [mix_override(root / "web", root / "code", **weights),
                                f"data.out_dir={root / 'out'}", "data.vocab_size=384",
                                "model.vocab_size=384", *overrides])


def prepared_root(tmp_path_factory, name: str) -> Path:
    """A new directory with the two sources written and their mix prepared in root/out."""
    from harness.data.mix_prepare import prepare_mix

    root = tmp_path_factory.mktemp(name)
    write_sources(root)
    prepare_mix(mix_cfg(root).data, progress=False)
    return root


def one_process_built(cfg, world_size: int = 1):
    """What run.open_shards/build_data read of a Built, without an engine: rank 0's view of
    `world_size` ranks, the plan, a CPU device; the broadcast is rank 0's own value."""
    from types import SimpleNamespace

    from harness.parallel.batch import make_plan

    comm = SimpleNamespace(broadcast_object=lambda obj, src=0: obj)
    return SimpleNamespace(comm=comm, dist=SimpleNamespace(rank=0, world_size=world_size),
                           plan=make_plan(cfg, world_size), engine=SimpleNamespace(device="cpu"))

