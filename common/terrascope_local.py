"""A local Terrascope catalogue on 127.0.0.1 for `dataset_downloader.py --demo` and its tests.

It answers what the `terracatalogueclient` library asks of the real service, so the real client runs
unchanged against it: the OpenSearch product search (`GET <catalogue>/products?collection=...&bbox=`,
GeoJSON pages with `next`/`last` links), the OpenID Connect password grant (`POST /token`) and
authorised file downloads (`HEAD`/`GET /files/...` with the bearer token; 401 without it). Products
are files on disk with a bounding box; each has one data file per path and a preview that a
"data files only" download must not fetch. `truncate_next(name)` makes the next download of that
file stop half-way (a dropped connection), and `downloads` counts the GETs per file name.
"""

import configparser
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

TOKEN = "local-access-token"


class LocalCatalogue:
    """`products`: {collection: [{"id", "bbox" (w, s, e, n), "files": [paths]}]}; a context manager."""

    def __init__(self, products, username="user", password="secret", page_size=2):
        self.products, self.username, self.password, self.page_size = products, username, password, page_size
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
        data = [
            {"href": f"{self.url}/files/{stem}/{Path(p).name}", "length": Path(p).stat().st_size}
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

    def do_POST(self):
        fields = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        catalogue = self.catalogue
        catalogue.token_requests += 1
        good = fields.get("grant_type") == ["password"] and fields.get("username") == [catalogue.username]
        if self.path == "/token" and good and fields.get("password") == [catalogue.password]:
            body = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}
            self.wfile.write(self._send(200, json.dumps(body).encode()))
        else:
            self.wfile.write(self._send(401, b'{"error": "invalid_grant"}'))

    def _file(self):
        name = urlparse(self.path).path.removeprefix("/files/")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return None, 401
        path = self.catalogue._files.get(name)
        return (path, 200) if path is not None else (None, 404)

    def do_HEAD(self):
        path, status = self._file()
        self._send(status, length=path.stat().st_size if path else 0)

    def do_GET(self):
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
