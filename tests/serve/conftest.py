from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def served(mini_export: Path) -> Iterator[object]:
    from bottlefit.serve.server import ServeOptions, Server

    server = Server(mini_export, ServeOptions(http_port=0, grpc_port=0, max_request_bytes=256 << 10)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def heldout_codes(mini_export: Path) -> tuple[object, object, np.ndarray]:
    """(target, int8 contract, codes of the built-in held-out photos under the head's reference semantics)."""
    from bottlefit.calibration.builtin import builtin_arrays
    from bottlefit.serve.contract import find_targets
    from bottlefit.serve.head import HeadCodes

    target = find_targets(mini_export)[0]
    contract = next(c for c in target.contracts if c.quantized)
    images, _ = builtin_arrays(target.card, "heldout")
    codes = HeadCodes(target, contract, reference=True)(np.asarray(images, dtype=np.float32))
    return target, contract, codes


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key): self-signed for 127.0.0.1 and localhost, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key
