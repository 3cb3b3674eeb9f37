"""The board clients' transport: one image's tensor over the Open Inference Protocol (KServe v2) REST with the
binary tensor extension, with retries.

Python >= 3.6 (JetPack 4's), the standard library and numpy only: this file is copied beside client.py into the
jetson and rpi board bundles (as boardcodec.py is), so both boards speak the same wire from one source.
"""

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

import numpy as np

# the KServe v2 binary tensor extension's header (the JSON part's length): the one definition, the host's
# server and client import it
HEADER = "Inference-Header-Content-Length"
# numpy dtype name -> KServe v2 datatype: the one table (bottlefit serve, the host client and both board clients)
V2_TYPES = {"float32": "FP32", "int8": "INT8", "uint8": "UINT8"}
TOKEN_ENV = "BOTTLEFIT_SERVE_TOKEN"
_SECURITY = {}


WIRES = ("int8", "context", "fp32")  # what a board sends: the host's `run-head --wire` names for them


def add_arguments(p):
    """The options every board client shares: where to send, what to send, how to retry, how to print. The names
    are the host's (`bottlefit run-head`); --codec and --fp32 are the old spellings of --wire."""
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the tail server (default %(default)s)")
    p.add_argument("--wire", choices=WIRES, default="int8",
                   help="how the bottleneck travels: int8 (the codes), context (the codes coded losslessly with the "
                        "export's context model; bottlefit serve, Triton's ensemble) or fp32 (dequantized; on "
                        "Triton: --model-name <arch>_tail_fp32) (default %(default)s)")
    p.add_argument("--fp32", dest="wire", nargs=0, action=_OldWire, help=argparse.SUPPRESS)
    p.add_argument("--codec", dest="wire", choices=("none", "context"), action=_OldWire, help=argparse.SUPPRESS)
    p.add_argument("--topk", type=int, default=5,
                   help="classes to print per image, with their softmax probabilities (default %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--ca-file", help="trust this certificate (or CA) for an https --server")
    p.add_argument("--token-file",
                   help=f"send 'Authorization: Bearer <the file's first line>' (default: ${TOKEN_ENV} if set)")


def warn_renamed(old, new):
    """The one line an old spelling prints on stderr (it still takes effect for this release)."""
    sys.stderr.write(f"warning: {old} is deprecated; use {new}\n")


class _Renamed(argparse.Action):
    """The old spelling of a renamed flag: its value goes where the new one's does, after one warning line."""

    def __init__(self, option_strings, dest, new="", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        warn_renamed(option_string, self.new)
        setattr(namespace, self.dest, values)


def add_renamed(p, new, old, **kwargs):
    """``p.add_argument(new, **kwargs)`` and ``old`` as its deprecated spelling, hidden from help."""
    action = p.add_argument(new, **kwargs)
    p.add_argument(old, dest=action.dest, action=_Renamed, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


class _OldWire(argparse.Action):
    """--fp32 and --codec none|context: the old spellings of --wire fp32 / int8 / context (together as before)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--fp32":
            namespace._old_fp32, said = True, option_string
        else:
            namespace._old_codec, said = values, f"{option_string} {values}"
        fp32, codec = getattr(namespace, "_old_fp32", False), getattr(namespace, "_old_codec", "none")
        if fp32 and codec == "context":
            parser.error("--codec context sends int8 codes; drop --fp32 (now: --wire context or --wire fp32)")
        wire = "fp32" if fp32 else ("context" if codec == "context" else "int8")
        warn_renamed(said, "--wire " + ("fp32" if option_string == "--fp32" else
                                        {"none": "int8", "context": "context"}[values]))
        setattr(namespace, self.dest, wire)


def topk(logits, k):
    """The ``k`` most likely classes of one image's logits as [(class, softmax probability, logit)], most likely
    first (the probabilities over all classes, computed stably)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    p = np.exp(z - z.max())
    p /= p.sum()
    return [(int(c), float(p[c]), float(z[c])) for c in np.argsort(-z, kind="stable")[:k]]


def security(options):
    """(SSL context or None, extra headers) from the options' ca_file / token_file (else $BOTTLEFIT_SERVE_TOKEN);
    read once per pair of files."""
    ca = getattr(options, "ca_file", None)
    token_file = getattr(options, "token_file", None)
    key = (ca, token_file)
    if key not in _SECURITY:
        try:
            ctx = ssl.create_default_context(cafile=ca) if ca else None
        except (OSError, ssl.SSLError) as e:
            raise RuntimeError(f"--ca-file {ca}: not a readable PEM certificate ({e})") from None
        token = os.environ.get(TOKEN_ENV) or None
        if token_file:
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.readline().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise RuntimeError(f"--token-file {token_file}: cannot read it ({e})") from None
        _SECURITY[key] = (ctx, {"Authorization": "Bearer " + token} if token else {})
    return _SECURITY[key]


def request_body(input_name, shape, datatype, params, blob):
    """(body, header length): the JSON header naming one binary input and a binary ``logits`` output, then the blob."""
    params = dict(params, binary_data_size=len(blob))
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(shape), "datatype": datatype,
                                     "parameters": params}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + blob, len(header)


def post(url, body, header_len, timeout, options=None):
    """One POST; (response JSON, logits) with the logits from JSON data or the binary section. ``options``: the
    parsed flags (--ca-file, --token-file)."""
    ctx, extra = security(options)
    headers = dict(extra)
    headers.update({HEADER: str(header_len), "Content-Type": "application/octet-stream"})
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
        data, n = r.read(), r.headers.get(HEADER)
    hl = int(n) if n is not None else len(data)
    resp = json.loads(data[:hl].decode("utf-8"))
    out = resp["outputs"][0]
    if "data" in out:
        return resp, np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    size = out["parameters"]["binary_data_size"]
    return resp, np.frombuffer(data[hl:hl + size], dtype="<f4").reshape(out["shape"])


def infer(url, body, header_len, timeout, retries, options=None):
    """POST with retries and exponential backoff on connection errors and 5xx/429; any other 4xx is final (the
    request itself is wrong: sending it again cannot help), and so is a certificate this side does not trust.
    Raises RuntimeError with the server's message."""
    for attempt in range(retries + 1):
        try:
            return post(url, body, header_len, timeout, options)
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read().decode("utf-8")).get("error", "")
            except (ValueError, AttributeError):
                msg = ""
            if e.code < 500 and e.code != 429 or attempt == retries:
                raise RuntimeError(f"HTTP {e.code}: {msg or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            if isinstance(getattr(e, "reason", e), ssl.SSLError):
                raise RuntimeError(f"TLS with {url} failed: {getattr(e, 'reason', e)} (pass the server's certificate "
                                   "or its CA with --ca-file)") from None
            if attempt == retries:
                raise RuntimeError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
        time.sleep(0.2 * 2 ** attempt)
    raise RuntimeError("unreachable")
