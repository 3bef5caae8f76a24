"""download_models.sh against a local HTTP mirror (NEON_DOWNLOAD_MIRROR): every file of every row is
fetched into a temporary copy of the script's folder, the sha256 manifests are written, an interrupted
.part resumes with a range request, and --verify passes, then names a corrupted and a missing file.

The Hugging Face files are fetched by the same curl path (HF_ENDPOINT/REPO/resolve/main/FILE), so
the mirror covers them too.
"""

import hashlib
import http.server
import os
import shutil
import subprocess
import threading

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash"
)


def content(path: str) -> bytes:
    """The mirror's bytes for a URL path: a few KB that differ from path to path."""
    return (hashlib.sha256(path.encode()).digest() * 200)[: 4000 + len(path)]


class Mirror(http.server.BaseHTTPRequestHandler):
    """Serves content(path) for every path, honouring `Range: bytes=START-`; logs (path, range)."""

    requests: list = []
    ranges = True  # False: ignore Range, as python -m http.server does

    def do_GET(self):
        body, start = content(self.path), 0
        self.requests.append((self.path, self.headers.get("Range")))
        if self.headers.get("Range") and self.ranges:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Mirror.requests, Mirror.ranges = [], True
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _run(folder, mirror, *args):
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and k not in ("HF_ENDPOINT", "HF_TOKEN")
    }
    return subprocess.run(
        ["bash", str(folder / "download_models.sh"), *args],
        capture_output=True,
        text=True,
        env={**env, "NEON_DOWNLOAD_MIRROR": mirror},
        timeout=120,
    )


def _manifest(path):
    return dict(reversed(line.split()) for line in path.read_text().splitlines())


def test_download_records_sha256_resumes_and_verifies(tmp_path, mirror):
    shutil.copy(os.path.join(REPO, "download_models.sh"), tmp_path)
    # A file already present before the first run is kept and recorded, not fetched.
    inception = (
        "/github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
    )
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / os.path.basename(inception)).write_bytes(content(inception))

    result = _run(tmp_path, mirror)
    assert result.returncode == 0, result.stderr
    assert "found; sha256 recorded" in result.stdout
    fetched = [path for path, _ in Mirror.requests]
    assert inception not in fetched and len(fetched) == len(set(fetched)) == 24
    # Every fetched file holds the mirror's bytes, under the name the recipes expect.
    for path in fetched:
        sub = "fid_stats" if path.endswith(".npz") else "checkpoints"
        name = ("sd-vae-ft-ema/" if "sd-vae-ft-ema" in path else "") + os.path.basename(path)
        assert (tmp_path / sub / name).read_bytes() == content(path), path
    for path in (
        "/huggingface.co/FoundationVision/var/resolve/main/var_d16.pth",
        "/huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/config.json",
        "/nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
    ):
        assert path in fetched
    # The manifests hold the sha256 of every file, in sha256sum's format, relative to their folder.
    sums = {sub: _manifest(tmp_path / sub / "SHA256SUMS") for sub in ("checkpoints", "fid_stats")}
    assert len(sums["checkpoints"]) == 21 and len(sums["fid_stats"]) == 4
    assert (
        sums["checkpoints"]["sd-vae-ft-ema/config.json"]
        == hashlib.sha256(
            content("/huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/config.json")
        ).hexdigest()
    )
    for sub, manifest in sums.items():
        for name, digest in manifest.items():
            assert hashlib.sha256((tmp_path / sub / name).read_bytes()).hexdigest() == digest
    assert not list(tmp_path.rglob("*.part"))

    # An interrupted download: a .part holding the first 1000 bytes resumes with a range request.
    ref = "/nvlabs-fi-cdn.nvidia.com/edm/fid-refs/ffhq-64x64.npz"
    target = tmp_path / "fid_stats" / "ffhq-64x64.npz"
    target.unlink()
    (tmp_path / "fid_stats" / "ffhq-64x64.npz.part").write_bytes(content(ref)[:1000])
    Mirror.requests = []
    result = _run(tmp_path, mirror, "fid")
    assert result.returncode == 0, result.stderr
    assert Mirror.requests == [(ref, "bytes=1000-")]
    assert (
        "resuming after 1000 bytes" in result.stdout and "ok   fid_stats/cifar10-32x32.npz" in result.stdout
    )
    assert target.read_bytes() == content(ref) and not target.with_name(target.name + ".part").exists()
    assert _manifest(tmp_path / "fid_stats" / "SHA256SUMS") == sums["fid_stats"]

    result = _run(tmp_path, mirror, "--verify")
    assert result.returncode == 0, result.stderr
    assert "checkpoints: 21 files match" in result.stdout and "fid_stats: 4 files match" in result.stdout

    # A corrupted file and a missing one: --verify fails and names both.
    data = bytearray((tmp_path / "checkpoints" / "var_d16.pth").read_bytes())
    data[100] ^= 1
    (tmp_path / "checkpoints" / "var_d16.pth").write_bytes(data)
    (tmp_path / "fid_stats" / "adm_in256_stats.npz").unlink()
    result = _run(tmp_path, mirror, "--verify")
    assert result.returncode == 1
    assert "checkpoints/var_d16.pth: FAILED" in result.stderr
    assert "fid_stats/adm_in256_stats.npz: FAILED" in result.stderr
    assert "error: the files above do not match" in result.stderr
    assert "vae_ch160v4096z32.pth" not in result.stderr


def test_verify_without_manifests_and_an_unknown_selector_fail(tmp_path, mirror):
    shutil.copy(os.path.join(REPO, "download_models.sh"), tmp_path)
    result = _run(tmp_path, mirror, "--verify")
    assert result.returncode == 1 and "download first" in result.stderr
    result = _run(tmp_path, mirror, "vqgan")
    assert result.returncode == 2 and "usage:" in result.stderr and not Mirror.requests


def test_a_failed_download_keeps_its_part_and_exits_nonzero(tmp_path):
    shutil.copy(os.path.join(REPO, "download_models.sh"), tmp_path)
    # Nothing listens on this mirror: curl fails, the script stops with a message, nothing is recorded.
    result = _run(tmp_path, "http://127.0.0.1:9", "fid")
    assert result.returncode == 1 and "error: could not download" in result.stderr
    assert not (tmp_path / "fid_stats" / "cifar10-32x32.npz").exists()
    assert not (tmp_path / "fid_stats" / "SHA256SUMS").exists()


def test_a_server_that_cannot_resume_gets_the_file_again_from_the_start(tmp_path, mirror):
    shutil.copy(os.path.join(REPO, "download_models.sh"), tmp_path)
    (tmp_path / "fid_stats").mkdir()
    ref = "/nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"
    (tmp_path / "fid_stats" / "cifar10-32x32.npz.part").write_bytes(b"x" * 1000)  # not even the right bytes
    Mirror.ranges = False
    result = _run(tmp_path, mirror, "fid")
    assert result.returncode == 0, result.stderr
    assert "the server cannot resume: from the start" in result.stdout
    assert Mirror.requests[:2] == [(ref, "bytes=1000-"), (ref, None)]
    assert (tmp_path / "fid_stats" / "cifar10-32x32.npz").read_bytes() == content(ref)
