"""ARAS400k download: WorldCover 2021 S2 RGBNIR composites and land-cover maps from Terrascope.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k), arXiv 2603.09625. The first step of the dataset pipeline, as the reference's
`dataset_downloader.py`: the products of the ESA WorldCover 2021 S2 RGBNIR composites
(`urn:eop:VITO:ESA_WorldCover_S2RGBNIR_10m_2021_V2`) and maps (`urn:eop:VITO:ESA_WorldCover_10m_2021_V2`)
whose footprint meets `--bbox` (default: the reference's Turkiye box), fetched with VITO's catalogue
client `terracatalogueclient` into `<out>/S2RGB_2021/<product>/` and
`<out>/worldcover_2021/<product>/`, the folders `dataset_creator.py` reads by default.

Unlike the reference it runs unattended (docs/aras400k.md, "dataset_downloader.py"): the password
grant reads the account from the environment ($TERRASCOPE_USERNAME, $TERRASCOPE_PASSWORD; never argv
or logs), there is no "[Y/n]" question, only data files are fetched (no previews or metadata), a
file already complete (size, and with --verify the checksum of download_manifest.csv) is skipped, a
dropped transfer is retried with exponential back-off, and every finished file is added to the
manifest (collection, product id, file, size, SHA-256) at once. `--dry_run` lists what would be
fetched. `--demo` runs the real client against `LocalCatalogue`, a stand-in for the Terrascope
catalogue on 127.0.0.1 (below), serving dataset_creator's demo tiles; its tests use it too.

Commands:
    TERRASCOPE_USERNAME=... TERRASCOPE_PASSWORD=... python dataset_downloader.py
    python dataset_downloader.py --dry_run                  # search only, no account needed
    python dataset_downloader.py --demo     # a local catalogue on 127.0.0.1 serving demo tiles
    python dataset_creator.py --s2_dir S2RGB_2021 --map_dir worldcover_2021 --out ARAS400k

Runtime: bound by the network (the full box is several hundred GB; every tile is one 3x3 degree
product). The demo takes a few seconds; its first transfer is cut half-way to show a retry. It prints
    summary: 4 products, 4 data files, fetched 4 (6.3 MB), complete before 0, retried 1; manifest
    results/dataset_downloader/demo/download_manifest.csv
"""

import argparse
import configparser
import contextlib
import csv
import hashlib
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

from common import atomic, cli, runs
from common.aras400k import demo_data
from common.errors import InputError, cli_entry, require, require_file

# The two collections of the reference: --collections key -> (catalogue id, output folder).
COLLECTIONS = {
    "s2": ("urn:eop:VITO:ESA_WorldCover_S2RGBNIR_10m_2021_V2", "S2RGB_2021"),
    "map": ("urn:eop:VITO:ESA_WorldCover_10m_2021_V2", "worldcover_2021"),
}
TURKIYE_BBOX = (25.668510437000105, 35.81543000000018, 44.83476000000008, 42.10757000000004)
MANIFEST = "download_manifest.csv"
MANIFEST_FIELDS = ["collection", "product_id", "file", "size", "sha256"]


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--bbox", type=float, nargs=4, default=TURKIYE_BBOX, help="west south east north (EPSG:4326).")
    add("--collections", nargs="+", choices=tuple(COLLECTIONS), default=["s2", "map"], help="What to fetch.")
    add("--out", default=".", help="Dataset folder: root of S2RGB_2021/, worldcover_2021/ and the manifest.")
    add(
        "--catalogue_config",
        default="",
        help="terracatalogueclient .ini overriding its Terrascope endpoints (empty: Terrascope).",
    )
    add("--username_env", default="TERRASCOPE_USERNAME", help="Environment variable holding the account.")
    add("--password_env", default="TERRASCOPE_PASSWORD", help="Environment variable holding its password.")
    add("--retries", type=int, default=5, help="Attempts after the first for a file that fails.")
    add("--backoff_s", type=float, default=2.0, help="Wait before retry k: backoff_s * 2**(k-1) seconds.")
    add("--dry_run", action="store_true", help="Search and list the files to fetch; download nothing.")
    add("--verify", action="store_true", help="Also check the SHA-256 of files the manifest lists.")
    cli.add_demo_argument(parser, "served by a local catalogue on 127.0.0.1 (a few seconds).")
    add("--demo_size", type=int, default=512, help=argparse.SUPPRESS)
    add("--results_dir", default="results", help="With --demo: root of the demo's output tree.")
    add("--seed", type=int, default=0, help="With --demo: seed of the demo tiles.")
    parser.demo_defaults(backoff_s=0.1)
    parser.renamed("--out_dir", "--out")
    return parser


# ---- the catalogue client ----


def open_catalogue(args, credentials):
    """terracatalogueclient's Catalogue on --catalogue_config; authenticated (password grant) when
    `credentials` is given. The client's search and download sessions retry 429/5xx answers."""
    from terracatalogueclient import Catalogue
    from terracatalogueclient.config import CatalogueConfig

    if args.catalogue_config:
        path = require_file(args.catalogue_config, "a catalogue .ini")
        require_own_endpoints(path)
        try:
            config = CatalogueConfig.from_file(str(path))
        except (configparser.Error, UnicodeDecodeError, KeyError, ValueError) as error:
            problem = f"is not a usable catalogue configuration ({type(error).__name__}: {short(error)[:80]})"
            raise InputError(
                path, problem, "a terracatalogueclient .ini ([Catalogue], [Auth], ...)"
            ) from None
    else:
        config = CatalogueConfig.get_default_config()
    catalogue = Catalogue(config)
    if credentials:
        catalogue = catalogue.authenticate_non_interactive(*credentials)
    return catalogue


def require_own_endpoints(path) -> None:
    """The client fills what a file lacks from the real Terrascope service: a partial --catalogue_config
    would silently reach it. Its catalogue URL and token endpoint must be in the file."""
    parser = configparser.ConfigParser()
    expected = "a terracatalogueclient .ini with [Catalogue] URL and [Auth] TokenEndpoint"
    try:
        parser.read_string(Path(path).read_text(encoding="utf-8"))
    except (configparser.Error, UnicodeDecodeError) as error:
        raise InputError(path, f"is not a readable .ini ({type(error).__name__})", expected) from None
    present = parser.has_option("Catalogue", "URL") and parser.has_option("Auth", "TokenEndpoint")
    require(present, path, "lacks the catalogue URL or the token endpoint", expected)


def read_credentials(args):
    """(username, password) from the environment: never a prompt, never argv."""
    username, password = os.environ.get(args.username_env, ""), os.environ.get(args.password_env, "")
    require(
        username and password,
        f"${args.username_env} / ${args.password_env}",
        "not set",
        "the Terrascope account in these environment variables (or --dry_run to only search)",
    )
    return username, password


def search(catalogue, collection, args):
    """Every product of `collection` meeting --bbox, all pages; a failed search is one error line."""
    from requests_auth.errors import GrantNotProvided, InvalidGrantRequest
    from terracatalogueclient.exceptions import SearchException, TooManyResultsException

    try:
        return list(catalogue.get_products(collection, bbox=list(args.bbox)))
    except (InvalidGrantRequest, GrantNotProvided):
        raise refused(args) from None
    except (SearchException, TooManyResultsException, OSError) as error:
        url = catalogue.config.catalogue_url
        problem = f"search of {collection} failed ({short(error)})"
        raise InputError(url, problem, what_to_check(error)) from None


def what_to_check(error) -> str:
    """The hint of a failed request: a rate limit says to wait, anything else names network and config."""
    if "429" in str(error) or "Too Many Requests" in str(error):
        return "to wait: the service answers 429 (rate-limiting); run again later (finished files are kept)"
    return (
        "a reachable catalogue: check the network and --catalogue_config; a re-run keeps the finished files"
    )


def refused(args) -> InputError:
    """The token endpoint turned the account down (the message never holds the password)."""
    return InputError(
        f"${args.username_env} / ${args.password_env}",
        "were refused by the token endpoint",
        "a valid Terrascope account",
    )


def short(error) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:160]


def product_folder(product) -> str:
    """The client's folder name for a product: its id after the last ':' (one sub-folder each)."""
    return product.id.rsplit(":", 1)[-1]


# ---- files ----


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path) -> dict:
    """The manifest of an earlier run, {file: row}; an unreadable one is one error line."""
    if not path.exists():
        return {}
    expected = f"the manifest an earlier run wrote ({', '.join(MANIFEST_FIELDS)}), or remove it"
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"is not a readable CSV ({type(error).__name__})", expected) from None
    require(fields == MANIFEST_FIELDS, path, "has another header", expected)
    for line, row in enumerate(rows, start=2):
        size = row.get("size") or ""
        ok = all(row.get(key) for key in MANIFEST_FIELDS) and size.isdigit() and len(row["sha256"]) == 64
        require(ok, path, f"line {line} is incomplete or malformed", expected)
    return {row["file"]: row for row in rows}


def is_complete(path, expected_size, record, verify) -> bool:
    """A file kept from an earlier run: the catalogue's size (or the manifest's), and the manifest's
    checksum with --verify."""
    if not path.exists():
        return False
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return False
    if record is None:
        return expected_size is not None
    return size == int(record["size"]) and (not verify or sha256(path) == record["sha256"])


def download(catalogue, product, product_file, target, args, counters):
    """One file through the client into `<product>/.partial/`, size-checked, renamed into place;
    retried with exponential back-off, over HTTP and S3 alike. Returns its SHA-256."""
    from botocore.exceptions import BotoCoreError, ClientError
    from requests_auth.errors import GrantNotProvided, InvalidGrantRequest
    from terracatalogueclient.exceptions import ProductDownloadException

    partial = target.parent / ".partial"
    where = f"{product.id}: {product_file.href}"
    for attempt in range(args.retries + 1):
        try:
            catalogue.download_file(product_file, str(partial))
            fetched = partial / target.name
            size = fetched.stat().st_size
            if product_file.length is not None and size != product_file.length:
                raise OSError(f"got {size} of {product_file.length} bytes")
            digest = sha256(fetched)
            os.replace(fetched, target)
            return digest
        except (InvalidGrantRequest, GrantNotProvided):
            raise refused(args) from None
        except ProductDownloadException as error:
            raise InputError(where, short(error), "an account allowed to download it") from None
        except ClientError as error:
            if s3_refused(error):
                raise InputError(
                    where,
                    f"refused by S3 ({short(error)})",
                    "S3 credentials allowed to read it ($AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY or "
                    "the [S3] section of --catalogue_config); a re-run keeps the finished files",
                ) from None
            last = error
        except (BotoCoreError, OSError) as error:  # requests' and botocore's transfer errors
            last = error
        if attempt == args.retries:
            raise InputError(
                where, f"failed {attempt + 1} times (last: {short(last)})", what_to_check(last)
            ) from None
        wait = args.backoff_s * 2**attempt
        counters["retried"] += 1
        print(f"retry {attempt + 1}/{args.retries} of {target.name} in {wait:.1f} s: {short(last)}")
        time.sleep(wait)
    raise AssertionError("unreachable")


def s3_refused(error) -> bool:
    """An S3 answer that another try would not change: 4xx (a missing key, no permission), except
    408 (timeout) and 429 (rate limit)."""
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in ("SlowDown", "Throttling", "RequestTimeout"):
        return False
    return 400 <= status < 500 and status not in (408, 429)


# ---- main's steps ----


def plan_files(catalogue, args, out_dir):
    """(collection, product, product file, target path) of every data file of the matching products."""
    plan = []
    for key in args.collections:
        collection, folder = COLLECTIONS[key]
        products = search(catalogue, collection, args)
        files = [(p, f) for p in products for f in p.data]  # data files only: no previews or metadata
        size = sum(f.length or 0 for _, f in files)
        print(f"{collection}: {len(products)} products, {len(files)} data files, {size / 1e6:.1f} MB")
        for product, product_file in files:
            target = out_dir / folder / product_folder(product) / os.path.basename(product_file.href)
            plan.append((collection, product, product_file, target))
    return plan


def fetch_all(catalogue, plan, args, out_dir):
    """Download what is not complete; the manifest is rewritten after every finished file."""
    manifest_path = out_dir / MANIFEST
    manifest = read_manifest(manifest_path)
    if out_dir.is_dir() and not args.dry_run:  # what an atomic write killed mid-way left behind
        runs.remove_stale_temporaries(out_dir)
    counters = {"fetched": 0, "fetched_bytes": 0, "complete": 0, "retried": 0}
    for collection, product, product_file, target in plan:
        name = target.relative_to(out_dir).as_posix()
        if is_complete(target, product_file.length, manifest.get(name), args.verify):
            counters["complete"] += 1
            digest = manifest[name]["sha256"] if name in manifest else sha256(target)
        elif args.dry_run:
            print(f"would fetch {name} ({(product_file.length or 0) / 1e6:.1f} MB)")
            continue
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = download(catalogue, product, product_file, target, args, counters)
            counters["fetched"] += 1
            counters["fetched_bytes"] += target.stat().st_size
            print(f"fetched {name}", flush=True)
        record = {"collection": collection, "product_id": product.id, "file": name}
        manifest[name] = {**record, "size": target.stat().st_size, "sha256": digest}
        if not args.dry_run:
            atomic.write_csv(
                manifest_path, sorted(manifest.values(), key=lambda r: r["file"]), MANIFEST_FIELDS
            )
    for folder in {target.parent / ".partial" for *_, target in plan}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return counters


# ---- a local Terrascope catalogue on 127.0.0.1, for --demo and the tests ----

# It answers what the `terracatalogueclient` library asks of the real service, so the real client runs
# unchanged against it: the OpenSearch product search (`GET <catalogue>/products?collection=...&bbox=`,
# GeoJSON pages with `next`/`last` links), the OpenID Connect password grant (`POST /token`) and
# authorised file downloads (`HEAD`/`GET /files/...` with the bearer token; 401 without it). Products
# are files on disk with a bounding box; each has one data file per path and a preview that a "data
# files only" download must not fetch. `truncate_next(name)` makes the next download of that file stop
# half-way (a dropped connection), `answer_status` (e.g. 429) answers every request with that status,
# `s3_bucket` gives s3:// data hrefs, and `downloads` counts the GETs per file name.

LOCAL_TOKEN = "local-access-token"


class LocalCatalogue:
    """`products`: {collection: [{"id", "bbox" (w, s, e, n), "files": [paths]}]}; a context manager."""

    def __init__(self, products, username="user", password="secret", page_size=2, s3_bucket=""):
        self.products, self.username, self.password, self.page_size = products, username, password, page_size
        self.s3_bucket = s3_bucket  # when set, data hrefs are s3://<bucket>/<product>/<file>
        self.answer_status = 0  # when set (e.g. 429), every request gets this status and no body
        self.downloads, self.token_requests = Counter(), 0
        self._truncate, self._files = set(), {}
        for collection_products in products.values():
            for product in collection_products:
                for path in product["files"]:
                    self._files[f"{product['id'].rsplit(':', 1)[-1]}/{Path(path).name}"] = Path(path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _CatalogueHandler)
        self._server.daemon_threads, self._server.catalogue = True, self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def truncate_next(self, name) -> None:
        self._truncate.add(name)

    def write_config(self, path) -> Path:
        """A terracatalogueclient .ini whose endpoints are this server (`--catalogue_config`)."""
        config = configparser.ConfigParser()
        config["Catalogue"] = {"URL": f"{self.url}/catalogue/"}
        config["Auth"] = {
            "ClientId": "terracatalogueclient",
            "ClientSecret": "",
            "TokenEndpoint": f"{self.url}/token",
            "AuthorizationEndpoint": f"{self.url}/auth",
            "InteractiveSupported": "False",
            "NonInteractiveSupported": "True",
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as file:
            config.write(file)
        return Path(path)

    def feature(self, product) -> dict:
        """One product as the catalogue's GeoJSON feature (data files, a preview, no acquisition data)."""
        west, south, east, north = product["bbox"]
        stem = product["id"].rsplit(":", 1)[-1]
        base = f"s3://{self.s3_bucket}" if self.s3_bucket else f"{self.url}/files"
        data = [
            {"href": f"{base}/{stem}/{Path(p).name}", "length": Path(p).stat().st_size}
            for p in product["files"]
        ]
        ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
        return {
            "type": "Feature",
            "id": product["id"],
            "bbox": [west, south, east, north],
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "title": stem,
                "acquisitionInformation": [],
                "links": {
                    "data": [{**link, "type": "image/tiff", "title": "data"} for link in data],
                    "previews": [{"href": f"{self.url}/files/{stem}/preview.png", "category": "QUICKLOOK"}],
                },
            },
        }

    def search(self, query) -> dict:
        """A page of the products of `collection` whose bbox meets the query's (1-based startIndex)."""
        collection = query.get("collection", [""])[0]
        west, south, east, north = (float(v) for v in query.get("bbox", ["-180,-90,180,90"])[0].split(","))
        hits = [
            p
            for p in self.products.get(collection, [])
            if p["bbox"][0] < east and p["bbox"][2] > west and p["bbox"][1] < north and p["bbox"][3] > south
        ]
        start = int(query.get("startIndex", ["1"])[0])
        page = hits[start - 1 : start - 1 + self.page_size]
        base = {key: values[0] for key, values in query.items() if key != "startIndex"}

        def link(index):
            return [{"href": f"{self.url}/catalogue/products?{urlencode({**base, 'startIndex': index})}"}]

        last_start = 1 + max(len(hits) - 1, 0) // self.page_size * self.page_size
        links = {"first": link(1), "last": link(last_start)}
        if start - 1 + self.page_size < len(hits):
            links["next"] = link(start + self.page_size)
        return {
            "type": "FeatureCollection",
            "totalResults": len(hits),
            "itemsPerPage": self.page_size,
            "properties": {"links": links},
            "features": [self.feature(p) for p in page],
        }


class _CatalogueHandler(BaseHTTPRequestHandler):
    """Requests of one connection; the LocalCatalogue is the server's `catalogue` attribute."""

    @property
    def catalogue(self) -> LocalCatalogue:
        return self.server.catalogue

    def log_message(self, *args):  # quiet: the tests and the demo print their own lines
        pass

    def _send(self, status, body=b"", content_type="application/json", length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        return body

    def _overridden(self) -> bool:
        if not self.catalogue.answer_status:
            return False
        self.wfile.write(self._send(self.catalogue.answer_status, b"{}"))
        return True

    def do_POST(self):
        if self._overridden():
            return
        fields = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        catalogue = self.catalogue
        catalogue.token_requests += 1
        good = fields.get("grant_type") == ["password"] and fields.get("username") == [catalogue.username]
        if self.path == "/token" and good and fields.get("password") == [catalogue.password]:
            body = {"access_token": LOCAL_TOKEN, "token_type": "Bearer", "expires_in": 3600}
            self.wfile.write(self._send(200, json.dumps(body).encode()))
        else:
            self.wfile.write(self._send(401, b'{"error": "invalid_grant"}'))

    def _file(self):
        name = urlparse(self.path).path.removeprefix("/files/")
        if self.headers.get("Authorization") != f"Bearer {LOCAL_TOKEN}":
            return None, 401
        path = self.catalogue._files.get(name)
        return (path, 200) if path is not None else (None, 404)

    def do_HEAD(self):
        path, status = self._file()
        self._send(status, length=path.stat().st_size if path else 0)

    def do_GET(self):
        if self._overridden():
            return
        parsed = urlparse(self.path)
        if parsed.path == "/catalogue/products":
            body = json.dumps(self.catalogue.search(parse_qs(parsed.query))).encode()
            self.wfile.write(self._send(200, body, "application/geo+json"))
            return
        path, status = self._file()
        if path is None:
            self.wfile.write(self._send(status, b"{}"))
            return
        data = path.read_bytes()
        self.catalogue.downloads[path.name] += 1
        if path.name in self.catalogue._truncate:  # a dropped connection: half the promised bytes
            self.catalogue._truncate.discard(path.name)
            self._send(200, content_type="image/tiff", length=len(data))
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(self._send(200, data, "image/tiff"))


def demo_catalogue(args):
    """--demo: two S2 tiles and two maps (dataset_creator's demo tiles) behind a local catalogue."""
    import rasterio
    from rasterio.warp import transform_bounds

    data = cli.demo_data_dir(args, "dataset_downloader")
    s2_dir, map_dir = demo_data.write_demo_tiles(data / "served", args.demo_size, args.seed)
    products = {}
    for key, folder in (("s2", s2_dir), ("map", map_dir)):
        collection = COLLECTIONS[key][0]
        products[collection] = []
        for path in sorted(folder.glob("*.tif")):
            with rasterio.open(path) as raster:  # the product's footprint, as the catalogue gives it
                bbox = transform_bounds(raster.crs, "EPSG:4326", *raster.bounds)
            products[collection].append({"id": f"{collection}:{path.stem}", "bbox": bbox, "files": [path]})
    catalogue = LocalCatalogue(products, username="demo", password="demo-password")
    args.catalogue_config = str(catalogue.write_config(data / "catalogue.ini"))
    args.out = str(Path(args.results_dir) / "dataset_downloader" / "demo")
    return catalogue


@cli_entry
def main(args):
    require(0 <= args.retries <= 100, "--retries", f"is {args.retries}", "0 to 100")
    require(0 <= args.backoff_s <= 3600, "--backoff_s", f"is {args.backoff_s}", "0 to 3600 seconds")
    west, south, east, north = args.bbox
    require(west < east and south < north, "--bbox", f"got {args.bbox}", "west < east and south < north")
    local = demo_catalogue(args) if args.demo else None
    runs.print_args(args)
    out_dir = Path(args.out)
    with local or contextlib.nullcontext():
        if args.dry_run:
            credentials = None  # the search needs no account
        elif local is not None:
            credentials = (local.username, local.password)
            local.truncate_next(local.products[COLLECTIONS["s2"][0]][0]["files"][0].name)  # show a retry
        else:
            credentials = read_credentials(args)
        catalogue = open_catalogue(args, credentials)

        # ---- search ----
        plan = plan_files(catalogue, args, out_dir)

        # ---- download ----
        counters = fetch_all(catalogue, plan, args, out_dir)
    products = len({product.id for _, product, _, _ in plan})
    summary = (
        f"summary: {products} products, {len(plan)} data files, fetched {counters['fetched']} "
        f"({counters['fetched_bytes'] / 1e6:.1f} MB), complete before {counters['complete']}, "
        f"retried {counters['retried']}"
        + (" (dry run)" if args.dry_run else f"; manifest {out_dir / MANIFEST}")
    )
    if args.demo and not args.dry_run:
        folders = [out_dir / COLLECTIONS[key][1] for key in ("s2", "map")]
        print(
            f"next: python dataset_creator.py --s2_dir {folders[0]} --map_dir {folders[1]} "
            "--split_level patch"
        )
    print(summary)
    return {"plan": [target for *_, target in plan], **counters, "summary": summary}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
