"""Download throughput: capfilt's download stage vs the img2dataset CLI on the same URLs.

    python benchmarks/download_throughput.py [--images 5000] [--image-size 256] [--work DIR]

What it does, in one run:

1. makes ``--images`` JPEGs (320-640 px sides, a gradient plus noise so they cost a real
   decode; cached in ``--work``), serves them with ``capfilt serve`` on 127.0.0.1 in a
   separate process (neither tool shares its interpreter with the server) and writes the
   URL list (``URL``, ``TEXT``) as Parquet;
2. runs ``img2dataset`` (download only: webdataset output, ``--image_size``, resize_mode
   border, jpg quality 95, 2 processes x 16 threads, no retries, EXIF extraction off);
3. runs ``capfilt run`` with only the download stage (no caption/filter: the images tar,
   dataset and samples Parquet are still written), image_size/resize_mode/quality the
   same, 16 threads per task, retries 0, ``allowed_hosts: [127.0.0.1]``; by default three
   times: ``per_host_connections`` 16 (img2dataset has no per-host cap, and all URLs are on
   one host), the default of 4, and 16 again. Ray is started before the timed part and its
   start-up is printed separately (on a cluster it is already up); the first run also pays
   for Ray's worker processes starting and importing capfilt (marked "cold workers");
4. times the download stage alone (``Downloader`` called in this process on batches of 64
   URLs, per-host cap 4), which is what the stage costs without Ray and the writer;
5. prints images/s side by side (successful images / wall seconds of the whole command)
   and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["no_proxy"] = "127.0.0.1,localhost"  # loopback never goes through a proxy

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_images(directory: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` JPEGs named img/NNNNN.jpg (made once, then reused); returns their paths."""
    names = [f"img/{i:05d}.jpg" for i in range(count)]
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        target = directory / name
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        if target.exists():
            continue
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
        base = (x * rng.uniform(0.2, 1.0, 3) + y * rng.uniform(0.2, 1.0, 3)) / 2
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(target, format="JPEG", quality=85)
    return names


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    """``capfilt serve DIR`` in its own process; returns it and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "capfilt.cli", "serve", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"capfilt serve did not start: {line!r}")
    return proc, match[1]


def run_img2dataset(url_file: Path, out: Path, size: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        "img2dataset", "--url_list", str(url_file), "--input_format", "parquet", "--url_col", "URL",
        "--caption_col", "TEXT", "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", "2", "--thread_count", "16", "--image_size", str(size),
        "--resize_mode", "border", "--encode_format", "jpg", "--encode_quality", "95",
        "--timeout", "10", "--retries", "0", "--number_sample_per_shard", "1000",
        "--extract_exif", "False", "--distributor", "multiprocessing",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return wall, ok


def run_capfilt(url_file: Path, out: Path, size: int, per_host: int) -> tuple[float, int, dict[str, int]]:
    from capfilt import pipeline
    from capfilt.config import PipelineConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = PipelineConfig.model_validate(
        {
            "input": {"path": str(url_file)},
            "download": {
                "image_size": size, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 95,
                "timeout_s": 10, "retries": 0, "threads": 16, "per_host_connections": per_host,
                "allowed_hosts": ["127.0.0.1"],
            },
            "output": {"dir": str(out), "rows_per_shard": 1000},
        }
    )  # fmt: skip
    start = time.perf_counter()
    pipeline.run(cfg)
    wall = time.perf_counter() - start
    statuses = json.loads((out / "manifest.json").read_text())["status"]
    return wall, int(statuses.get("ok", 0)), statuses


def run_stage(url_file: Path, size: int, per_host: int) -> tuple[float, int]:
    """The download stage alone, in this process: ``Downloader`` over batches of 64 URLs."""
    from capfilt.config import DownloadConfig
    from capfilt.stages.download import Downloader

    cfg = DownloadConfig(
        image_size=size, resize_mode="border", encode_format="jpg", encode_quality=95, timeout_s=10,
        retries=0, threads=16, per_host_connections=per_host, allowed_hosts=["127.0.0.1"],
    )  # fmt: skip
    urls = np.array(pq.read_table(url_file).column("URL").to_pylist(), dtype=object)
    start = time.perf_counter()
    downloader = Downloader(cfg=cfg)  # imports img2dataset's resizer: counted
    ok = 0
    for i in range(0, len(urls), 64):
        ok += int((downloader({"url": urls[i : i + 64]})["status"] == "ok").sum())
    return time.perf_counter() - start, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_download"))
    parser.add_argument(
        "--per-host",
        default="16,4,16",
        help="per_host_connections of each capfilt run, in order (comma-separated); the first run "
        "also pays for starting and importing Ray's workers",
    )
    args = parser.parse_args()

    work = args.work.resolve()
    site = work / "site"
    t0 = time.perf_counter()
    names = make_images(site, args.images)
    print(f"images: {len(names)} in {site} ({time.perf_counter() - t0:.1f} s to make or find)")
    server, base = serve(site)
    try:
        url_file = work / "urls.parquet"
        pq.write_table(
            pa.table(
                {"URL": [f"{base}/{n}" for n in names], "TEXT": [f"image {i}" for i in range(len(names))]}
            ),
            url_file,
        )
        load_before = os.getloadavg()
        i2d_wall, i2d_ok = run_img2dataset(url_file, work / "img2dataset", args.image_size)
        stage_wall, stage_ok = run_stage(url_file, args.image_size, 4)

        per_hosts = [int(v) for v in args.per_host.split(",") if v.strip()]
        import ray

        t_ray = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t_ray
        try:
            runs = []
            for per_host in per_hosts:
                wall, ok, statuses = run_capfilt(
                    url_file, work / f"capfilt_{per_host}", args.image_size, per_host
                )
                runs.append((per_host, wall, ok, statuses))
        finally:
            ray.shutdown()
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(timeout=30)

    i2d_rate = i2d_ok / i2d_wall
    print(
        f"\nmachine: {os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print(f"{len(names)} URLs on 127.0.0.1, image_size {args.image_size}, resize_mode border, jpg q95\n")
    print(f"{'tool':<52} {'ok':>6} {'wall s':>8} {'images/s':>9} {'vs img2dataset':>15}")
    print(
        f"{'img2dataset (2 processes x 16 threads)':<52} {i2d_ok:>6} {i2d_wall:>8.1f} {i2d_rate:>9.1f} {1.0:>14.2f}x"
    )
    name = "capfilt download stage alone, 1 process (cap 4)"
    print(f"{name:<52} {stage_ok:>6} {stage_wall:>8.1f} {stage_ok / stage_wall:>9.1f} "
          f"{stage_ok / stage_wall / i2d_rate:>14.2f}x")  # fmt: skip
    for i, (per_host, wall, ok, statuses) in enumerate(runs):
        name = f"capfilt, per_host_connections {per_host}" + (" (cold workers)" if i == 0 else "")
        print(f"{name:<52} {ok:>6} {wall:>8.1f} {ok / wall:>9.1f} {ok / wall / i2d_rate:>14.2f}x")
        if ok != len(names):
            print(f"  statuses: {statuses}")
    print(f"\nRay start-up (not in capfilt's wall time): {ray_start:.1f} s")


if __name__ == "__main__":
    main()
