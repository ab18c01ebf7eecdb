"""One sha256 per image across the manifests (of its bytes as stored in the images tar), and a URL list's extra
columns never dropped without a word."""

from __future__ import annotations

import hashlib
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.cli import main
from pipeline.demo import DEMO_MANIFEST, make_demo_data, serve_directory


def test_sha256_is_of_the_stored_bytes_in_every_manifest(tmp_path, capsys):
    data = make_demo_data(tmp_path / "data", n_images=3, size=48)
    root = tmp_path / "root"
    with serve_directory(data) as served:
        rows = [{"url": f"{served}/{r['file']}", "caption": r["reference_caption"], "licence": "cc-by",
                 "scene_id": r["scene_id"]} for r in pq.read_table(data / "world.parquet").to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows), data / "urls.parquet")
        download = yaml.safe_load(DEMO_MANIFEST.read_text())["download"]
        download.update(urls=str(data / "urls.parquet"), save_additional_columns=["scene_id"], image_size=32,
                        resize_mode="keep_ratio", resize_only_if_bigger=True)  # 48 px scenes are stored resized
        manifest = tmp_path / "m.yaml"
        manifest.write_text(yaml.safe_dump({"root": str(root), "shard_size": 3, "download": download,
                                            "annotate": {"captioner": {"backend": "noop"}}}))
        assert main(["run", "--stage", "download", "--shards", "0", "--no-progress", "-m", str(manifest)]) == 0
    err = capsys.readouterr().err
    assert "download: the URL list's column(s) licence are not kept in the shards" in err
    assert main(["run", "--stage", "annotate", "--shards", "0", "--no-progress", "-m", str(manifest)]) == 0
    with tarfile.open(root / "images" / "00000.tar") as tar:
        stored = {m.name.split(".")[0]: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                  for m in tar.getmembers() if m.name.endswith(".png")}
    images = {r["key"]: r["sha256"] for r in pq.read_table(root / "images" / "00000.parquet").to_pylist()}
    captions = {r["key"]: r["sha256"] for r in pq.read_table(root / "captions" / "00000.parquet").to_pylist()}
    assert len(stored) == 3 and images == stored == captions
