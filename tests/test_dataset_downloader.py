"""dataset_downloader.py with the real terracatalogueclient against a local catalogue on 127.0.0.1
(dataset_downloader.LocalCatalogue), then dataset_creator.py on what it wrote."""

import csv
import hashlib
import shutil
import socket

import numpy as np
import pytest
import rasterio
from conftest import assert_main_error, call_main, run_script

import dataset_creator
import dataset_downloader as dd
from common.raster import write_geotiff

RES = 1.0 / 1200


def served_products(folder):
    """Two S2 products and two map products (small GeoTIFFs in the release's names and formats)."""
    rng = np.random.default_rng(0)
    products = {dd.COLLECTIONS["s2"][0]: [], dd.COLLECTIONS["map"][0]: []}
    for tile, lon0 in (("N36E027", 27.0), ("N36E030", 30.0)):
        transform = rasterio.Affine(RES, 0, lon0, 0, -RES, 39.0)
        stem = f"ESA_WorldCover_10m_2021_v200_{tile}"
        s2 = folder / f"{stem}_S2RGBNIR.tif"
        write_geotiff(s2, rng.integers(200, 3000, (4, 256, 512)).astype(np.uint16), transform=transform)
        codes = np.full((256, 512), 10, np.uint8)
        codes[:, 256:] = 40
        land_cover = folder / f"{stem}_Map.tif"
        write_geotiff(land_cover, codes, transform=transform, nodata=0)
        bbox = (lon0, 39.0 - 256 * RES, lon0 + 512 * RES, 39.0)
        for key, path in (("s2", s2), ("map", land_cover)):
            collection = dd.COLLECTIONS[key][0]
            products[collection].append({"id": f"{collection}:{path.stem}", "bbox": bbox, "files": [path]})
    return products


@pytest.fixture
def catalogue(tmp_path, monkeypatch):
    served = tmp_path / "served"
    with dd.LocalCatalogue(served_products(served), username="alice", password="s3cret-pw") as local:
        local.config = local.write_config(tmp_path / "catalogue.ini")
        monkeypatch.setenv("TERRASCOPE_USERNAME", "alice")
        monkeypatch.setenv("TERRASCOPE_PASSWORD", "s3cret-pw")
        yield local


def argv(tmp_path, local, *extra):
    return ["--catalogue_config", local.config, "--out", tmp_path / "data", "--backoff_s", "0", *extra]


def test_help():
    result = run_script("dataset_downloader.py", "--help")
    assert result.returncode == 0 and "--dry_run" in result.stdout and "--bbox" in result.stdout


def test_download_retries_skips_complete_files_and_feeds_dataset_creator(tmp_path, catalogue, capsys):
    catalogue.truncate_next("ESA_WorldCover_10m_2021_v200_N36E030_Map.tif")  # a dropped connection
    result = call_main(dd, argv(tmp_path, catalogue))
    assert result["fetched"] == 4 and result["retried"] == 1 and result["complete"] == 0
    assert "retry 1/5 of ESA_WorldCover_10m_2021_v200_N36E030_Map.tif" in capsys.readouterr().out
    data = tmp_path / "data"
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert files == [
        "S2RGB_2021/ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR/ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR.tif",
        "S2RGB_2021/ESA_WorldCover_10m_2021_v200_N36E030_S2RGBNIR/ESA_WorldCover_10m_2021_v200_N36E030_S2RGBNIR.tif",
        "download_manifest.csv",
        "worldcover_2021/ESA_WorldCover_10m_2021_v200_N36E027_Map/ESA_WorldCover_10m_2021_v200_N36E027_Map.tif",
        "worldcover_2021/ESA_WorldCover_10m_2021_v200_N36E030_Map/ESA_WorldCover_10m_2021_v200_N36E030_Map.tif",
    ]  # one folder per product, data files only (no preview.png), no .partial left
    with open(data / "download_manifest.csv") as file:
        manifest = list(csv.DictReader(file))
    assert list(manifest[0]) == dd.MANIFEST_FIELDS and len(manifest) == 4
    for row in manifest:
        served = tmp_path / "served" / row["file"].split("/")[-1]
        assert int(row["size"]) == served.stat().st_size
        assert row["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
        assert row["product_id"].endswith(":" + served.stem)
    assert catalogue.downloads["ESA_WorldCover_10m_2021_v200_N36E030_Map.tif"] == 2

    # A re-run fetches nothing; a damaged file (other size) and, with --verify, other bytes are redone.
    before = sum(catalogue.downloads.values())
    assert call_main(dd, argv(tmp_path, catalogue))["complete"] == 4
    assert sum(catalogue.downloads.values()) == before
    s2_file = data / files[0]
    s2_file.write_bytes(s2_file.read_bytes()[:1000])
    assert call_main(dd, argv(tmp_path, catalogue))["fetched"] == 1
    content = bytearray(s2_file.read_bytes())
    content[-1] ^= 1
    s2_file.write_bytes(bytes(content))
    assert call_main(dd, argv(tmp_path, catalogue))["fetched"] == 0  # same size: taken as complete
    assert call_main(dd, argv(tmp_path, catalogue, "--verify"))["fetched"] == 1

    # dataset_creator reads the one-folder-per-product layout as it is.
    out = tmp_path / "ARAS400k"
    creator = ["--s2_dir", data / "S2RGB_2021", "--map_dir", data / "worldcover_2021", "--out", out]
    report = call_main(dataset_creator, [*creator, "--split_level", "patch"])
    assert report["totals"]["kept"] == 4 and report["totals"]["tiles_failed"] == 0
    assert len(list(out.glob("*/images/*.png"))) == 4


def test_dry_run_lists_files_without_an_account_or_a_download(tmp_path, catalogue, capsys, monkeypatch):
    monkeypatch.delenv("TERRASCOPE_PASSWORD")
    result = call_main(dd, argv(tmp_path, catalogue, "--dry_run", "--collections", "map"))
    output = capsys.readouterr().out
    assert len(result["plan"]) == 2 and result["fetched"] == 0 and not catalogue.downloads
    assert output.count("would fetch worldcover_2021/") == 2 and "(dry run)" in output
    assert not (tmp_path / "data").exists() and catalogue.token_requests == 0


def test_bbox_selects_products(tmp_path, catalogue):
    result = call_main(dd, argv(tmp_path, catalogue, "--dry_run", "--bbox", "27.1", "38", "27.2", "38.9"))
    assert [p.name for p in result["plan"]] == [
        "ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR.tif",
        "ESA_WorldCover_10m_2021_v200_N36E027_Map.tif",
    ]


def test_missing_or_refused_credentials_are_one_line_without_the_password(
    tmp_path, catalogue, capsys, monkeypatch
):
    monkeypatch.delenv("TERRASCOPE_USERNAME")
    line = assert_main_error(capsys, lambda: call_main(dd, argv(tmp_path, catalogue)), "$TERRASCOPE_USERNAME")
    assert "not set" in line
    monkeypatch.setenv("TERRASCOPE_USERNAME", "alice")
    monkeypatch.setenv("TERRASCOPE_PASSWORD", "wrong-pw-123")
    line = assert_main_error(capsys, lambda: call_main(dd, argv(tmp_path, catalogue)), "refused")
    assert "wrong-pw-123" not in line and not list((tmp_path / "data").rglob("*.tif"))


# ---- S3 hrefs and remote failures: retried, then one line naming what to check; finished files kept ----


class FakeS3:
    """boto3's S3 resource as the client uses it (`Bucket(name).download_file(key, path)`), serving the
    local catalogue's files; `failures` lists the botocore errors the next downloads raise, in order."""

    def __init__(self, local, failures):
        self.local, self.failures, self.keys = local, list(failures), []

    def Bucket(self, name):
        assert name == self.local.s3_bucket
        return self

    def download_file(self, key, path):
        self.keys.append(key)
        if self.failures:
            raise self.failures.pop(0)
        shutil.copyfile(self.local._files[key], path)


def s3_client(monkeypatch, local, failures):
    from terracatalogueclient import Catalogue

    fake = FakeS3(local, failures)
    monkeypatch.setattr(Catalogue, "_init_s3_client", lambda self: setattr(self, "s3", fake))
    return fake


def client_error(status, code):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_s3_failures_are_retried_then_one_line_naming_product_and_href(
    tmp_path, catalogue, capsys, monkeypatch
):
    from botocore.exceptions import EndpointConnectionError

    catalogue.s3_bucket = "worldcover"
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    fake = s3_client(monkeypatch, catalogue, [unreachable, client_error(503, "SlowDown")])
    result = call_main(dd, argv(tmp_path, catalogue))
    assert result["fetched"] == 4 and result["retried"] == 2 and len(fake.keys) == 6
    assert "retry 2/5 of ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR.tif" in capsys.readouterr().out

    # Every try fails: one line naming the product and the href, exit 2; finished files and manifest kept.
    (tmp_path / "data" / "S2RGB_2021").rename(tmp_path / "gone")
    s3_client(monkeypatch, catalogue, [unreachable] * 3)
    line = assert_main_error(
        capsys, lambda: call_main(dd, argv(tmp_path, catalogue, "--retries", "2")), "failed 3 times"
    )
    assert "s3://worldcover/ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR/" in line
    assert dd.COLLECTIONS["s2"][0] + ":ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR" in line
    assert "check the network" in line
    assert len(list((tmp_path / "data" / "worldcover_2021").rglob("*.tif"))) == 2
    assert (tmp_path / "data" / "download_manifest.csv").exists()

    # A refusal (403) is not retried.
    fake = s3_client(monkeypatch, catalogue, [client_error(403, "AccessDenied")])
    line = assert_main_error(capsys, lambda: call_main(dd, argv(tmp_path, catalogue)), "refused by S3")
    assert "AWS_ACCESS_KEY_ID" in line and len(fake.keys) == 1


def test_unreachable_or_rate_limiting_catalogue_is_one_line(tmp_path, catalogue, capsys, monkeypatch):
    from urllib3.util.retry import Retry

    monkeypatch.setattr(Retry, "get_backoff_time", lambda self: 0)  # the client's own back-off, not waited
    catalogue.answer_status = 429
    line = assert_main_error(capsys, lambda: call_main(dd, argv(tmp_path, catalogue, "--dry_run")), "429")
    assert "rate-limiting" in line
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "unreachable.ini"
    config.write_text(catalogue.config.read_text().replace(catalogue.url, f"http://127.0.0.1:{port}"))
    unreachable = ["--catalogue_config", config, "--out", tmp_path / "data"]
    line = assert_main_error(capsys, lambda: call_main(dd, unreachable), f"127.0.0.1:{port}")
    assert "check the network and --catalogue_config" in line
    assert not (tmp_path / "data").exists()
