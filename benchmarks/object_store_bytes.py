"""Driver peak RSS and object-store bytes per image of `capfilt run`, for one or two code versions.

    python benchmarks/object_store_bytes.py --out runs/bench-bytes [--rows 2000] [--model-rows 200]
        [--before-code DIR]

Serves distinct 256x256 JPEGs on 127.0.0.1 and starts one local Ray (2 CPUs); every run is a
fresh subprocess (a driver joining that Ray, as with ``ray.address: auto`` on a cluster):

* ``download``: ``--rows`` URL rows, download-only (no models), 500-row shards;
* ``models``: ``--model-rows`` rows through a tiny captioner and filter whose vision towers take
  384 px input (BLIP's size, so the pixel columns have their real size), 100-row shards.

Per run it prints the driver's peak RSS (sampled from /proc every 20 ms, and ru_maxrss) and, per
Ray Data operator, the bytes it put into the object store per row (``output_size_bytes`` from Ray
Data's stats). The last operator's output is what the driver's loop receives.

``--before-code DIR`` runs the same scenarios a second time with ``capfilt`` (and ``model``)
imported from DIR, e.g. an older checkout extracted with
``git archive a4dec69 capfilt model | tar -x -C /tmp/capfilt-before``; figures are printed side by
side and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- child: one run


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(config: Path, result: Path) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import capfilt.pipeline as pipeline
    from capfilt.config import load

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.02)

    captured: list[dict] = []

    def stage_bytes(ds):  # replaces pipeline._stage_stats in whichever version is imported
        summary = ds._get_stats_summary()  # noqa: SLF001
        chain, pending = [], [summary]
        while pending:
            node = pending.pop()
            chain.append(node)
            pending.extend(node.parents)
        for node in reversed(chain):
            for op in node.operators_stats:
                rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
                size = int(op.output_size_bytes.sum) if op.output_size_bytes else 0
                captured.append({"operator": op.operator_name, "rows": rows, "bytes": size})
        return []

    pipeline._stage_stats = stage_bytes  # noqa: SLF001
    cfg = load(config)
    before = _rss_mb()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    pipeline.run(cfg)
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    result.write_text(
        json.dumps(
            {
                "code": str(Path(pipeline.__file__).resolve().parents[1]),
                "rss_at_start_mb": round(before, 1),
                "peak_rss_mb": round(max(peak[0], _rss_mb()), 1),
                "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "wall_s": round(wall, 1),
                "stages": captured,
            },
            indent=2,
        )
    )


# --------------------------------------------------------------------------- parent


def _images(directory: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (directory / f"img{i}.jpg").write_bytes(buffer.getvalue())


def _models(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from support import WORDS

    from model.med import MED, MEDConfig
    from model.tokenizer import special_ids, train_tokenizer

    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=120)
    config = MEDConfig.preset("tiny").replace(
        image_size=384, patch_size=32, vision_width=32, vision_layers=1, vision_heads=2,
        vision_intermediate=64, text_width=32, text_layers=1, text_heads=2, text_intermediate=64,
        queue_size=64, embed_dim=16, max_position_embeddings=48, **special_ids(tokenizer),
    )  # fmt: skip
    paths = []
    for name, seed in (("captioner", 0), ("filter", 1)):
        import torch

        torch.manual_seed(seed)
        MED(config).save(root / name, tokenizer)
        paths.append(root / name)
    return paths[0], paths[1]


def _write_config(
    path: Path, *, urls: Path, out: Path, rows_per_shard: int, models: tuple[Path, Path] | None, address: str
) -> None:
    import yaml

    config: dict = {
        "input": {"path": str(urls)},
        "download": {
            "image_size": 384, "resize_mode": "keep_ratio", "threads": 8, "timeout_s": 10,
            "allowed_hosts": ["127.0.0.1"],  # the images are served on loopback
        },
        "output": {"dir": str(out), "rows_per_shard": rows_per_shard},
        "ray": {"address": address},
    }
    if models is not None:
        config["caption"] = {"model": str(models[0]), "max_length": 8, "min_length": 2, "batch_size": 16}
        config["filter"] = {"model": str(models[1]), "batch_size": 32}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bytes"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--model-rows", type=int, default=200)
    parser.add_argument("--before-code", type=Path, default=None)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.serve import LoopbackServer

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _images(out / "www", 100)
    models = _models(out / "models")
    versions = {"after": None}
    if args.before_code is not None:
        versions = {"before": args.before_code.resolve(), **versions}
    results: dict[str, dict] = {}
    import ray

    # One Ray instance (2 CPUs) for every run: each run is a driver that joins it.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    with LoopbackServer(directory=out / "www") as server:
        for scenario, rows, shard, with_models in (
            ("download", args.rows, 500, None),
            ("models", args.model_rows, 100, models),
        ):
            urls = out / f"urls-{rows}.parquet"
            pq.write_table(
                pa.table(
                    {
                        "URL": [f"{server.url}/img{i % 100}.jpg?{i}" for i in range(rows)],
                        "TEXT": [f"picture number {i}" for i in range(rows)],
                    }
                ),
                urls,
            )
            for version, code in versions.items():
                name = f"{scenario}-{version}"
                config = out / f"{name}.yaml"
                _write_config(
                    config,
                    urls=urls,
                    out=out / "runs" / name,
                    rows_per_shard=shard,
                    models=with_models,
                    address=address,
                )
                result = out / f"{name}.json"
                env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "no_proxy": "127.0.0.1,localhost"}
                if code is not None:
                    env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
                subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(result)],
                    check=True,
                    env=env,
                    cwd=out,
                )
                results[name] = {"rows": rows, **json.loads(result.read_text())}
                _print(name, results[name])
    ray.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=2))


def _print(name: str, result: dict) -> None:
    rows = result["rows"]
    print(
        f"\n{name}: {rows} rows, driver peak RSS {result['peak_rss_mb']} MB "
        f"(at start {result['rss_at_start_mb']} MB, ru_maxrss {result['ru_maxrss_mb']} MB), "
        f"{result['wall_s']} s  [{result['code']}]"
    )
    for stage in result["stages"]:
        per_row = stage["bytes"] / stage["rows"] if stage["rows"] else 0
        print(f"  {stage['operator'][:90]:<90} {stage['rows']:>6} rows {per_row:>12,.0f} B/row")


if __name__ == "__main__":
    main()
