"""The ``context`` codec's model and its encoder, in the standard library and numpy only (Python >= 3.6), and the
wire frame's header and payload decoders (constriction and zstandard, imported where used).

This one file is the single source of the context model and of the frame decoder: :mod:`bottlefit.serve.codecs`
imports it on the host (``bottlefit serve`` decodes with it), the rpi and jetson board bundles ship a verbatim
copy that their ``client.py`` encodes with, so a board needs nothing from this package, and the Triton
repository's decode step ships another copy that it decodes with. Everything that decides a symbol's
probability is integer arithmetic on integer tables: the board (ARM) and the server (x86) compute the same
frequencies bit for bit, whatever their float units do.

The model, per image of C x H x W symbols (uint8; the contract's codes shifted to 0..255):

- order: channel by channel, each channel along wavefronts ``d = 2h + w`` (left, up, up-left and up-right of a
  symbol lie on earlier wavefronts); channel c runs ``LAG`` wavefronts behind channel c - 1, so at step
  ``t = d + LAG * c`` every channel before c is already known at and around (h, w). A decoder decodes one step
  (every active channel's wavefront) per call;
- prediction: a fixed-point linear predictor per channel and gradient class, from the left/up/up-left/up-right
  neighbours, the 5-neighbourhoods of the two previous channels and the same position of older ones (fitted
  on the calibration codes by least absolute deviations);
- the residual's distribution: an integer histogram per (channel, error-energy class of the neighbours' and
  previous channels' residuals, distance of the prediction from the zero point);
- the zero point itself (a spike: exact zeros of the float bottleneck) gets its own probability per (channel,
  distance class, how many known neighbours are exactly zero).

Frequencies are quantized to ``2**24 - 256`` per symbol and coded with rANS exactly as constriction's
``stack.AnsCoder`` (32-bit words, 64-bit state, 24-bit precision) with ``Categorical(perfect=False)`` codes
them when given these integer frequencies as float64: the board's pure-Python encoder writes the words that
constriction decodes.
"""

import hashlib
import os
import struct
import zlib

import numpy as np

PRECISION = 24
TOTAL = (1 << PRECISION) - 256  # constriction adds 1 to each of the 256 symbols: 2**24 in all
FRAC = 12  # fixed-point bits of the predictor's weights
LAG = 3  # wavefronts between one channel and the next (the previous channel's down/right neighbours are known)
N_GRAD = 4  # predictor classes (local gradient)
N_ENERGY = 8  # residual classes (neighbours' error energy)
N_NEAR = 3  # |prediction - zero point|: 0, 1, >= 2
N_ZERO = 7  # known neighbours that are exactly the zero point: 0 .. 6+
N_ZERO_ENERGY = 2  # error-energy classes of the zero point's probability
ADAPT = 2048  # weight of a residual seen in this image (a calibration histogram weighs 2**20: 512 residuals)
N_PREV_FULL = 2  # previous channels whose 5-neighbourhood feeds the predictor
TABLE_KEYS = ("zero_symbol", "fill", "grad_edges", "weights", "energy_edges", "residual", "zero")


def n_features(c):
    """Predictor inputs of channel c: 4 causal neighbours, 5 per recent channel, 1 per older one, a constant."""
    recent = min(c, N_PREV_FULL)
    return 4 + 5 * recent + (c - recent) + 1


def steps(c_count, h, w):
    return 2 * (h - 1) + w + LAG * (c_count - 1)


def wavefront(h, w, d):
    """Positions (rows, cols) of wavefront d = 2 * row + col, rows ascending."""
    hs = np.arange(max(0, (d - w + 2) // 2), min(h - 1, d // 2) + 1)
    return hs, d - 2 * hs


def order(c_count, h, w):
    """(channel, row, col) of every symbol in coding order: by step t = 2 * row + col + LAG * channel, then channel,
    then row (one wavefront per channel per step, rows ascending)."""
    cc, hh, ww = (a.reshape(-1) for a in np.indices((c_count, h, w)))
    at = np.lexsort((hh, cc, 2 * hh + ww + LAG * cc))
    return cc[at], hh[at], ww[at]


OFFSETS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, 0), (0, 1), (1, 0))
LEFT, UP, UPLEFT, UPRIGHT, HERE, RIGHT, DOWN = OFFSETS


class Neighbourhood:
    """Flat indices of the neighbours of positions (rows, cols) in an H x W plane, clamped to the plane, and
    whether each neighbour is inside it (computed once per set of positions, shared by every channel)."""

    def __init__(self, h, w, rows, cols):
        self.size = rows.size
        self.here = rows * w + cols
        self.idx, self.ok, self.inside = {}, {}, {}
        for dh, dw in OFFSETS:
            r, q = rows + dh, cols + dw
            self.ok[dh, dw] = (r >= 0) & (r < h) & (q >= 0) & (q < w)
            self.inside[dh, dw] = bool(self.ok[dh, dw].all())
            self.idx[dh, dw] = np.minimum(np.maximum(r, 0), h - 1) * w + np.minimum(np.maximum(q, 0), w - 1)

    def at(self, plane, off, fill):
        """plane (flat) at the neighbour ``off``; ``fill`` outside the image."""
        if self.inside[off]:
            return plane[self.idx[off]]
        return np.where(self.ok[off], plane[self.idx[off]], fill)

    def clamped(self, plane, off):
        return plane[self.idx[off]]


def features(sym, c, nb, fill):
    """The predictor's inputs (n, n_features(c)) int64 and gradient g (n,) of channel c at the positions of
    ``nb``, reading only what a decoder knows there. ``sym``: (C, H * W) int64."""
    x = sym[c]
    left, up = nb.at(x, LEFT, fill), nb.at(x, UP, fill)
    upleft, upright = nb.at(x, UPLEFT, fill), nb.at(x, UPRIGHT, fill)
    cols_ = [left, up, upleft, upright]
    for cc in range(c):
        if cc >= c - N_PREV_FULL:
            for off in (HERE, RIGHT, DOWN, LEFT, UP):
                cols_.append(nb.clamped(sym[cc], off))
        else:
            cols_.append(sym[cc][nb.here])
    cols_.append(np.ones(nb.size, dtype=np.int64))
    grad = np.abs(left - upleft) + np.abs(up - upleft) + np.abs(up - upright)
    return np.stack(cols_, axis=1), grad


def predict(feats, grad, weights_c, grad_edges_c):
    """Fixed-point prediction in 0..255 (int64)."""
    g = np.searchsorted(grad_edges_c, grad, side="right")
    w = weights_c[g, : feats.shape[1]]
    p = ((feats * w).sum(axis=1) + (1 << (FRAC - 1))) >> FRAC
    return np.minimum(np.maximum(p, 0), 255)


def energy(res, c, nb):
    """Error energy of the known residuals around the positions: same channel and previous channels."""
    a = np.abs(res[c])
    e = 2 * nb.at(a, LEFT, 0) + 2 * nb.at(a, UP, 0) + nb.at(a, UPLEFT, 0) + nb.at(a, UPRIGHT, 0)
    if c > 0:
        e = e + 2 * np.abs(res[c - 1][nb.here]) + (6 * np.abs(res[:c, nb.here]).sum(axis=0)) // c
    return e


def zero_count(sym, c, nb, zsym):
    """How many known neighbours (left, up, up-left, up-right, the two previous channels here) are the zero point."""
    x = sym[c]
    n = np.zeros(nb.size, dtype=np.int64)
    for off in (LEFT, UP, UPLEFT, UPRIGHT):
        n += nb.ok[off] & (x[nb.idx[off]] == zsym)
    for cc in range(max(0, c - 2), c):
        n += sym[cc][nb.here] == zsym
    return n


def prediction(tables, sym, c, nb):
    """Channel c's predictions at the positions of ``nb`` (int64, 0..255). ``sym``: (C, H * W)."""
    f, g = features(sym, c, nb, int(tables["fill"][c]))
    return predict(f, g, tables["weights"][c], tables["grad_edges"][c])


def contexts(tables, sym, res, c, nb, p):
    """(residual-table row, zero-table row) of channel c's symbols at the positions of ``nb``, predicted ``p``.
    ``sym``, ``res``: (C, H * W)."""
    zsym = int(tables["zero_symbol"])
    near = np.minimum(np.abs(p - zsym), N_NEAR - 1)
    e = np.searchsorted(tables["energy_edges"][c], energy(res, c, nb), side="right")
    k = (c * N_ENERGY + e) * N_NEAR + near
    z = np.minimum(zero_count(sym, c, nb, zsym), N_ZERO - 1)
    return k, ((c * N_NEAR + near) * N_ZERO + z) * N_ZERO_ENERGY + e * N_ZERO_ENERGY // N_ENERGY


def cumulative(tables):
    """Per residual-table row: 0 and the running sum of its 511 integer weights (512 entries)."""
    r = tables["residual"].reshape(-1, 511)
    return np.concatenate([np.zeros((r.shape[0], 1), dtype=np.int64), np.cumsum(r, axis=1)], axis=1)


class Adaptive:
    """The residual tables as coding goes: the calibration's weights plus ``ADAPT`` per residual already seen in
    this image in the same context (counted per step, so a decoder that decodes a step at a time agrees)."""

    def __init__(self, tables, cum=None):
        self.cum = cumulative(tables) if cum is None else cum
        self.seen = np.zeros((self.cum.shape[0], 511), dtype=np.int64)
        self.now = self.cum.copy()  # cum + ADAPT * running sum of seen, kept current for the rows that changed
        self.zsym = int(tables["zero_symbol"])

    def window(self, k, p):
        """Cumulative weights (n, 257) of rows ``k`` at residuals -p .. 256 - p: symbols 0 .. 256."""
        at = (k * 512 + 255 - p)[:, None] + np.arange(257)
        return self.now.reshape(-1)[at]

    def update(self, k, p, s):
        nz = s != self.zsym
        if not nz.any():
            return
        np.add.at(self.seen, (k[nz], s[nz] - p[nz] + 255), 1)
        touched = np.unique(k[nz])
        self.now[touched, 1:] = self.cum[touched, 1:] + ADAPT * np.cumsum(self.seen[touched], axis=1)


def _zero_freq(tables, zk):
    z = tables["zero"].reshape(-1, 2)
    return (TOTAL * (z[zk, 0] + 1)) // (z[zk, 1] + 2)


def quantized(tables, model, k, p, zk, s):
    """Left cumulative and frequency (before constriction's +1 per symbol) of symbols ``s`` (n,), given each
    symbol's prediction ``p``, residual-table row ``k`` (read from ``model``, an :class:`Adaptive`, now) and
    zero-table row ``zk``: the reference, one step at a time (:func:`quantized_all` gives the encoder every step's
    at once; :func:`alphabet_frequencies` is the decoder's whole-alphabet form)."""
    zsym = int(tables["zero_symbol"])
    at = k * 512 + 255 - p  # residual -p of row k: symbol x is at + x
    now = model.now.reshape(-1)
    base = now[at]
    w_zero = now[at + zsym + 1] - now[at + zsym]
    mass = now[at + 256] - base - w_zero
    fz = _zero_freq(tables, zk)
    rest = TOTAL - fz

    def cq(x):  # quantized cumulative of the non-zero symbols below x
        cw = now[at + x] - base
        cw = np.where(x > zsym, cw - w_zero, cw)
        return (rest * cw) // mass

    lo = cq(s)
    left = np.where(s > zsym, lo + fz, lo)
    freq = np.where(s == zsym, fz, cq(s + 1) - lo)
    return left, freq


class Plan:
    """Gather indices of every symbol of a C x H x W image, in coding order, into one flat array of the image's
    symbols followed by a few extra slots (each channel's fill value, a constant 1, a slot that is never a
    symbol): with them one step's (or the whole image's) predictions and contexts are a handful of vectorized
    gathers for every channel at once, the same integers as :func:`prediction` and :func:`contexts` channel by
    channel. Depends only on the shape (cached)."""

    def __init__(self, c_count, h, w):
        hw = h * w
        cc, hh, ww = order(c_count, h, w)
        self.n = cc.size
        self.ch = cc
        self.flat = cc * hw + hh * w + ww
        self.fill = c_count * hw  # + c: channel c's fill value
        self.one = self.fill + c_count  # always 1 (the predictor's constant; padding, weighted 0)
        self.none = self.one + 1  # -1 in the symbols (never the zero point), 0 in the absolute residuals
        self.size = self.none + 1
        self.bounds = np.searchsorted(2 * hh + ww + LAG * cc, np.arange(steps(c_count, h, w) + 1))
        nf = n_features(c_count - 1)
        # int32: the two tables that grow with C * C * H * W stay small even for wide bottlenecks
        self.feat = np.full((self.n, nf), self.one, dtype=np.int32)
        self.zero = np.full((self.n, 6), self.none, dtype=np.int64)  # neighbours, two previous channels here
        self.prev = np.full((self.n, max(c_count - 1, 1)), self.none, dtype=np.int32)  # every previous channel here
        self.nbr = np.empty((self.n, 5), dtype=np.int64)  # |residual| at left, up, up-left, up-right, c-1 here
        for c in range(c_count):
            m = np.flatnonzero(cc == c)
            rows, cols = hh[m], ww[m]
            idx, ok = {}, {}
            for dh, dw in OFFSETS:
                r, q = rows + dh, cols + dw
                ok[dh, dw] = (r >= 0) & (r < h) & (q >= 0) & (q < w)
                idx[dh, dw] = np.minimum(np.maximum(r, 0), h - 1) * w + np.minimum(np.maximum(q, 0), w - 1)
            cols_ = [np.where(ok[o], c * hw + idx[o], self.fill + c) for o in (LEFT, UP, UPLEFT, UPRIGHT)]
            for prev in range(c):
                if prev >= c - N_PREV_FULL:
                    cols_ += [prev * hw + idx[o] for o in (HERE, RIGHT, DOWN, LEFT, UP)]
                else:
                    cols_.append(prev * hw + idx[HERE])
            self.feat[m, : len(cols_)] = np.stack(cols_, axis=1)
            near = [np.where(ok[o], c * hw + idx[o], self.none) for o in (LEFT, UP, UPLEFT, UPRIGHT)]
            self.zero[m, :4] = np.stack(near, axis=1)
            for j, prev in enumerate(range(max(0, c - 2), c)):
                self.zero[m, 4 + j] = prev * hw + idx[HERE]
            for prev in range(c):
                self.prev[m, prev] = prev * hw + idx[HERE]
            self.nbr[m, :4] = self.zero[m, :4]
            self.nbr[m, 4] = (c - 1) * hw + idx[HERE] if c else self.none
        self.divisor = np.maximum(cc, 1)


_PLANS = {}


def plan(c_count, h, w):
    """The (read-only, shared) :class:`Plan` of this shape."""
    key = (c_count, h, w)
    p = _PLANS.get(key)
    if p is None:
        p = Plan(c_count, h, w)
        if len(_PLANS) >= 8:  # one shape per served contract: a few at most
            _PLANS.clear()
        _PLANS[key] = p
    return p


class Batched:
    """The context model over a :class:`Plan`: predictions and context rows of any run of symbols in coding
    order (a decoder's step, or a whole image for the encoder), every channel at once."""

    def __init__(self, tables, pl):
        self.plan = pl
        c_count = tables["weights"].shape[0]
        nf = pl.feat.shape[1]
        w = np.zeros((c_count, N_GRAD, nf), dtype=np.int64)
        for c in range(c_count):  # weights past a channel's own features read the padding: zero them
            w[c, :, : n_features(c)] = tables["weights"][c, :, : n_features(c)]
        self.weights = w
        self.grad_edges = np.asarray(tables["grad_edges"], dtype=np.int64)
        self.energy_edges = np.asarray(tables["energy_edges"], dtype=np.int64)
        self.zsym = int(tables["zero_symbol"])
        self.fill = np.asarray(tables["fill"], dtype=np.int64)

    def buffers(self):
        """(symbols, |residuals|): the flat arrays the plan's indices read, extra slots set."""
        pl = self.plan
        sym = np.zeros(pl.size, dtype=np.int64)
        sym[pl.fill : pl.one] = self.fill
        sym[pl.one] = 1
        sym[pl.none] = -1
        return sym, np.zeros(pl.size, dtype=np.int64)

    def predict(self, sym, a, b):
        """Predictions (int64, 0..255) of symbols a..b in coding order (searchsorted(side="right") on sorted
        edges is the count of edges <= x)."""
        pl = self.plan
        ch = pl.ch[a:b]
        f = sym[pl.feat[a:b]]
        left, up, upleft, upright = f[:, 0], f[:, 1], f[:, 2], f[:, 3]
        grad = np.abs(left - upleft) + np.abs(up - upleft) + np.abs(up - upright)
        g = (self.grad_edges[ch] <= grad[:, None]).sum(axis=1)
        p = ((f * self.weights[ch, g]).sum(axis=1) + (1 << (FRAC - 1))) >> FRAC
        return np.minimum(np.maximum(p, 0), 255)

    def contexts(self, sym, ares, p, a, b):
        """(residual-table row, zero-table row) of symbols a..b predicted ``p``; ``ares``: |residuals|."""
        pl = self.plan
        ch = pl.ch[a:b]
        r = ares[pl.nbr[a:b]]
        e = 2 * r[:, 0] + 2 * r[:, 1] + r[:, 2] + r[:, 3] + 2 * r[:, 4] + \
            (6 * ares[pl.prev[a:b]].sum(axis=1)) // pl.divisor[a:b]
        e = (self.energy_edges[ch] <= e[:, None]).sum(axis=1)
        near = np.minimum(np.abs(p - self.zsym), N_NEAR - 1)
        z = np.minimum((sym[pl.zero[a:b]] == self.zsym).sum(axis=1), N_ZERO - 1)
        k = (ch * N_ENERGY + e) * N_NEAR + near
        return k, ((ch * N_NEAR + near) * N_ZERO + z) * N_ZERO_ENERGY + e * N_ZERO_ENERGY // N_ENERGY


def alphabet_frequencies(tables, window, zk):
    """Frequencies (n, 256) of every symbol (before constriction's +1), as :func:`quantized` gives them one
    symbol at a time, from :meth:`Adaptive.window` and zero-table rows ``zk`` (n,) (the decoder)."""
    zsym = int(tables["zero_symbol"])
    cw = window - window[:, :1]
    w_zero = cw[:, zsym + 1] - cw[:, zsym]
    cw[:, zsym + 1 :] -= w_zero[:, None]  # the zero point has its own probability: out of the residual's mass
    fz = _zero_freq(tables, zk)
    cq = ((TOTAL - fz)[:, None] * cw) // cw[:, 256:]
    freq = cq[:, 1:] - cq[:, :-1]
    freq[:, zsym] = fz
    return freq


def prepare(tables, sym):
    """Every symbol of one image (C, H, W) in coding order: (symbols, left cumulative, frequency), all int64."""
    sym = np.asarray(sym, dtype=np.int64)
    flat, bounds = coding_order(*sym.shape)
    # the encoder knows every symbol: the whole image's model at once, in image layout, then in coding order
    p, k, zk = (v.reshape(-1)[flat] for v in image_model(tables, sym))
    s = sym.reshape(-1)[flat]
    left, freq = quantized_all(tables, _cumulative(tables), bounds, k, p, zk, s)
    return s, left, freq


_ORDERS = {}


def coding_order(c_count, h, w):
    """(image index of every symbol in coding order, each step's first symbol and the end): all the encoder needs
    of a :class:`Plan` (whose gather tables the decoder needs), cached per shape."""
    key = (c_count, h, w)
    o = _ORDERS.get(key)
    if o is None:
        pl = _PLANS.get(key)
        if pl is not None:
            o = (pl.flat, pl.bounds)
        else:
            cc, hh, ww = order(c_count, h, w)
            o = (cc * (h * w) + hh * w + ww,
                 np.searchsorted(2 * hh + ww + LAG * cc, np.arange(steps(c_count, h, w) + 1)))
        if len(_ORDERS) >= 8:  # one shape per served contract: a few at most
            _ORDERS.clear()
        _ORDERS[key] = o
    return o


def _cached(tables, name, make):
    """A value derived from ``tables``, kept in the dict (a board encodes many frames with one set of tables)."""
    v = tables.get(name)
    if v is None:
        v = make(tables)
        try:
            tables[name] = v
        except TypeError:  # a read-only mapping: derive it each frame
            pass
    return v


def _slot_weights(tables):
    """The predictor's weights, float64, over one layout of inputs shared by every channel:
    left, up, up-left, up-right; here, right, down, left, up of channel c - 1, then of c - 2; here of channels 0 ..
    C - 1 (older than c - 2); the constant. Inputs a channel does not have weigh 0."""
    wt = np.asarray(tables["weights"], dtype=np.int64)
    c_count = wt.shape[0]
    out = np.zeros((c_count, N_GRAD, 15 + c_count), dtype=np.float64)
    for c in range(c_count):
        slots = [0, 1, 2, 3]
        for prev in range(c):
            slots += [14 + prev] if prev < c - N_PREV_FULL else list(range(4, 9) if prev == c - 1 else range(9, 14))
        slots.append(14 + c_count)
        out[c][:, slots] = wt[c, :, : len(slots)]
    # (per-channel inputs and the constant (C, N_GRAD, 15), older channels here (C * N_GRAD, C)): the older
    # channels are the same planes for every channel, one matrix product instead of C copies
    return out[:, :, list(range(14)) + [14 + c_count]].copy(), out[:, :, 14 : 14 + c_count].reshape(-1, c_count)


def image_model(tables, sym):
    """Predictions and (residual-table row, zero-table row) of every symbol of one image (C, H, W) int64, in image
    layout, from shifted planes instead of per-symbol gathers: the integers of :class:`Batched` (the predictor's
    sum runs as a float64 matrix product: products < 2**32 and sums < 2**37 of integers are exact in float64)."""
    c_count, h, w = sym.shape
    fill = np.asarray(tables["fill"], dtype=np.int64)
    zsym = int(tables["zero_symbol"])
    pf = np.empty((c_count, h + 1, w + 2), dtype=np.int64)  # fill outside: the causal neighbours
    pf[:] = fill[:, None, None]
    pf[:, 1:, 1:-1] = sym
    left, up, upleft, upright = pf[:, 1:, :w], pf[:, :h, 1:-1], pf[:, :h, :w], pf[:, :h, 2:]
    pe = np.empty((c_count, h + 2, w + 2), dtype=np.int64)  # clamped: the previous channels' neighbourhoods
    pe[:, 1:-1, 1:-1] = sym
    pe[:, 0], pe[:, -1] = pe[:, 1], pe[:, -2]
    pe[:, :, 0], pe[:, :, -1] = pe[:, :, 1], pe[:, :, -2]
    around = (sym, pe[:, 1:-1, 2:], pe[:, 2:, 1:-1], pe[:, 1:-1, :-2], pe[:, :-2, 1:-1])  # here right down left up
    f = np.zeros((c_count, 15, h, w), dtype=np.float64)  # the inputs that differ per channel, and the constant
    f[:, 0], f[:, 1], f[:, 2], f[:, 3] = left, up, upleft, upright
    for o, plane in enumerate(around):
        f[1:, 4 + o] = plane[:-1]
        f[2:, 9 + o] = plane[:-2]
    f[:, 14] = 1
    grad = np.abs(left - upleft) + np.abs(up - upleft) + np.abs(up - upright)
    g = np.zeros((c_count, h, w), dtype=np.int64)
    for edge in np.asarray(tables["grad_edges"], dtype=np.int64).T:  # searchsorted(side="right"): edges <= grad
        g += grad >= edge[:, None, None]
    wl, wo = _cached(tables, "_slot_weights", _slot_weights)
    acc = np.matmul(wl, f.reshape(c_count, 15, h * w))
    acc += np.dot(wo, sym.reshape(c_count, h * w).astype(np.float64)).reshape(c_count, N_GRAD, h * w)
    # each position's gradient class (fancy indexing, not take_along_axis: JetPack 4's numpy is 1.13)
    acc = acc[np.arange(c_count)[:, None], g.reshape(c_count, h * w), np.arange(h * w)].reshape(c_count, h, w)
    p = np.minimum(np.maximum((acc.astype(np.int64) + (1 << (FRAC - 1))) >> FRAC, 0), 255)
    a = np.abs(sym - p)
    pa = np.zeros((c_count, h + 1, w + 2), dtype=np.int64)  # 0 outside
    pa[:, 1:, 1:-1] = a
    e = 2 * pa[:, 1:, :w] + 2 * pa[:, :h, 1:-1] + pa[:, :h, :w] + pa[:, :h, 2:]
    if c_count > 1:
        older = np.cumsum(a[:-1], axis=0)  # channels before c: 0 .. c - 1
        e[1:] += 2 * a[:-1] + (6 * older) // np.arange(1, c_count)[:, None, None]
    ec = np.zeros((c_count, h, w), dtype=np.int64)
    for edge in np.asarray(tables["energy_edges"], dtype=np.int64).T:
        ec += e >= edge[:, None, None]
    near = np.minimum(np.abs(p - zsym), N_NEAR - 1)
    isz = np.zeros((c_count, h + 1, w + 2), dtype=np.int64)  # outside is never the zero point
    isz[:, 1:, 1:-1] = sym == zsym
    z = isz[:, 1:, :w] + isz[:, :h, 1:-1] + isz[:, :h, :w] + isz[:, :h, 2:]
    z[1:] += isz[:-1, 1:, 1:-1]
    z[2:] += isz[:-2, 1:, 1:-1]
    z = np.minimum(z, N_ZERO - 1)
    ch = np.arange(c_count)[:, None, None]
    k = (ch * N_ENERGY + ec) * N_NEAR + near
    return p, k, ((ch * N_NEAR + near) * N_ZERO + z) * N_ZERO_ENERGY + ec * N_ZERO_ENERGY // N_ENERGY


def _cumulative(tables):
    return _cached(tables, "_cumulative", cumulative)


EVENT_BLOCK = 4  # events per block of the encoder's count table (see quantized_all)


def quantized_all(tables, cum, bounds, k, p, zk, s):
    """:func:`quantized` of every symbol of an image at once, with :class:`Adaptive`'s counts as they stand at
    each symbol's step, without stepping: a symbol of step t and row k reads the calibration's cumulative weights
    plus ``ADAPT`` x the number of non-zero-point symbols ("events") of earlier steps in row k whose residual
    column is below the column read. That is a 2-D dominance count: with the events sorted by (row, step), each
    row's events padded to whole blocks of ``EVENT_BLOCK``, the earlier steps of row k are the positions [row
    start, P); F(P, j), the events before position P with column < j, is a table at every block start plus the
    few events of P's block before P. Same integers as stepping :class:`Adaptive` (tests/serve/
    test_boardcodec_speed.py)."""
    zsym = int(tables["zero_symbol"])
    n_rows = cum.shape[0]
    n_steps = bounds.size - 1
    B = EVENT_BLOCK
    step = np.repeat(np.arange(n_steps), np.diff(bounds))
    ev = np.flatnonzero(s != zsym)
    ek = k[ev]
    # stable: (row, step), steps ascend ("mergesort": "stable" needs numpy >= 1.15; int16 rows sort by radix)
    srt = np.argsort(ek.astype(np.int16) if n_rows < 1 << 15 else ek, kind="mergesort")
    ek = ek[srt]
    ecol = (s - p + 255)[ev][srt]
    key = k * n_steps + step
    before = np.zeros(n_rows * n_steps + 1, dtype=np.int64)  # events before (row, step) in (row, step) order
    np.cumsum(np.bincount(key[ev], minlength=n_rows * n_steps), out=before[1:])
    count = np.bincount(ek, minlength=n_rows)
    first = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(count, out=first[1:])
    padded = np.zeros(n_rows + 1, dtype=np.int64)  # each row's first position, rows padded to whole blocks
    np.cumsum((count + B - 1) // B * B, out=padded[1:])
    pos = padded[ek] + np.arange(ek.size) - first[ek]
    nb = int(padded[-1]) // B
    pad = np.full(nb * B + B, 512, dtype=np.int64)  # 512: never below a column
    pad[pos] = ecol
    # the table's columns: the distinct event columns only (col < j <=> rank(col) < rank(j), rank(j) = how many
    # distinct event columns lie below j); residuals cluster, so this is a few dozen columns, not 512
    rank = np.zeros(513, dtype=np.int64)
    np.cumsum(np.bincount(ecol, minlength=512) > 0, out=rank[1:])
    wd = int(rank[-1]) + 1
    # minlength >= 1: numpy < 1.14 refuses 0 (an image whose every symbol is the zero point has no events)
    hist = np.bincount((pos // B) * wd + rank[ecol] + 1, minlength=max(nb * wd, 1))[: nb * wd].reshape(nb, wd)
    table = np.zeros((nb + 1, wd), dtype=np.int64)  # table[b, rank(j)]: events before block b with column < j
    np.cumsum(np.cumsum(hist, axis=1), axis=0, out=table[1:])
    table = table.reshape(-1)
    p0 = padded[k]
    p1 = p0 + before[key] - first[k]  # row k's events of earlier steps: padded positions [p0, p1)
    b1 = p1 // B
    lane = np.arange(B)[:, None]
    g1 = pad[b1 * B + lane]  # (B, n): the events of p1's block before p1, others 512
    g1[lane >= (p1 - b1 * B)] = 512
    b1, b0 = b1 * wd, (p0 // B) * wd
    row = k * 512 + 255 - p  # residual -p of row k: symbol x is at column 255 - p + x
    flat = cum.reshape(-1)

    def now(x):  # Adaptive.now at symbol x of each symbol's window
        j = 255 - p + x
        r = rank[j]
        seen = table[b1 + r] - table[b0 + r] + (g1 < j).sum(axis=0)
        return flat[row + x] + ADAPT * seen

    base = now(0)
    at_z = now(zsym)
    w_zero = now(zsym + 1) - at_z
    mass = now(256) - base - w_zero
    fz = _zero_freq(tables, zk)
    rest = TOTAL - fz

    def cq(x):  # quantized cumulative of the non-zero symbols below x (x: per symbol)
        cw = now(x) - base
        cw = np.where(x > zsym, cw - w_zero, cw)
        return (rest * cw) // mass

    lo = cq(s)
    left = np.where(s > zsym, lo + fz, lo)
    freq = np.where(s == zsym, fz, cq(s + 1) - lo)
    return left, freq


def ans_encode(left, freq):
    """rANS over (left cumulative, frequency) pairs in decoding order -> 32-bit words, exactly as constriction's
    AnsCoder(encode_reverse) with Categorical(perfect=False) over these integer frequencies writes them."""
    words = []
    put = words.append
    x = 0  # a plain int: the state exceeds int64
    mask = 0xFFFFFFFF
    # x -> (x // f << PRECISION) + start + x % f, written as x + x // f * (2**PRECISION - f) + start: one big-int
    # operation fewer per symbol in the interpreter (the board's cost is this loop's bytecodes)
    gaps = ((1 << PRECISION) - freq).tolist()
    for start, f, gap in zip(reversed(left.tolist()), reversed(freq.tolist()), reversed(gaps)):  # noqa: B905
        if x >> (64 - PRECISION) >= f:
            put(x & mask)
            x >>= 32
        x += x // f * gap + start
    while x:
        put(x & mask)
        x >>= 32
    return np.array(words, dtype="<u4").tobytes()


def encode(tables, sym, jit=None):
    """One image's symbols (C, H, W) -> the coded stream (bytes). ``jit``: use the compiled encoder (numba; None:
    when numba is importable and BOARDCODEC_JIT is not 0); the same bytes either way."""
    kernels = _kernels() if jit is None or jit else None
    if jit and kernels is None:
        raise RuntimeError("the compiled context encoder needs numba (pip install numba); jit=None falls back")
    if kernels is not None:
        return _encode_compiled(kernels, tables, sym)
    s, left, freq = prepare(tables, sym)
    return ans_encode(left + s, freq + 1)  # constriction's leak: one more count for every symbol


# -- the compiled encoder (optional): the same integers as image_model, quantized_all and ans_encode, as plain loops
# that numba compiles (numba is not required: a board without it, e.g. JetPack 4's Python 3.6, runs the numpy
# path above). Compiled once per process, kept on disk by numba's cache (beside this file in __pycache__ when that
# folder is writable, else in the user's ~/.cache/numba; NUMBA_CACHE_DIR overrides both).

def _image_kernel(sym, fill, weights, grad_edges, energy_edges, zsym, rank, so, po, ko, zko):
    """:func:`image_model` of sym (C, H, W) int64: each symbol, its prediction and (residual row, zero row), written
    at its coding position ``rank`` (image index -> position) into so, po, ko, zko. Flat arrays, indexed by
    unsigned integers (``_u``): numba then skips the negative-index wraparound it adds to every signed index."""
    c_count, h, w = sym.shape
    n_grad_edges = grad_edges.shape[1]
    n_energy_edges = energy_edges.shape[1]
    nf = weights.shape[2]
    hw, we = h * w, w + 2
    he = (h + 2) * we
    sf, wf, gf, ef_ = sym.reshape(-1), weights.reshape(-1), grad_edges.reshape(-1), energy_edges.reshape(-1)
    pf = np.empty((c_count, h + 1, w + 2), dtype=np.int64)  # fill outside: the causal neighbours
    pe = np.empty((c_count, h + 2, w + 2), dtype=np.int64)  # clamped: the previous channels' neighbourhoods
    for c in range(c_count):
        for y in range(h + 2):
            yy = min(max(y - 1, 0), h - 1)
            for x in range(w + 2):
                pe[c, y, x] = sym[c, yy, min(max(x - 1, 0), w - 1)]
        pf[c] = fill[c]
        pf[c, 1:, 1 : w + 1] = sym[c]
    ff, ee = pf.reshape(-1), pe.reshape(-1)
    pred = np.empty(c_count * hw, dtype=np.int64)
    for c in range(c_count):
        for y in range(h):
            for x in range(w):
                at = c * (h + 1) * we + (y + 1) * we + x  # pf at (c, y + 1, x): left
                left, up, upleft, upright = ff[_u(at)], ff[_u(at - we + 1)], ff[_u(at - we)], ff[_u(at - we + 2)]
                grad = abs(left - upleft) + abs(up - upleft) + abs(up - upright)
                g = 0
                for j in range(n_grad_edges):
                    if gf[_u(c * n_grad_edges + j)] <= grad:
                        g += 1
                i = (c * N_GRAD + g) * nf
                acc = wf[_u(i)] * left + wf[_u(i + 1)] * up + wf[_u(i + 2)] * upleft + wf[_u(i + 3)] * upright
                i += 4
                here = y * w + x
                for prev in range(c - N_PREV_FULL):  # older channels: here
                    acc += wf[_u(i)] * sf[_u(prev * hw + here)]
                    i += 1
                for prev in range(max(c - N_PREV_FULL, 0), c):  # here, right, down, left, up
                    e = prev * he + (y + 1) * we + x + 1
                    acc += wf[_u(i)] * ee[_u(e)] + wf[_u(i + 1)] * ee[_u(e + 1)] + wf[_u(i + 2)] * ee[_u(e + we)] \
                        + wf[_u(i + 3)] * ee[_u(e - 1)] + wf[_u(i + 4)] * ee[_u(e - we)]
                    i += 5
                acc += wf[_u(i)]
                pred[_u(c * hw + here)] = min(max((acc + (1 << (FRAC - 1))) >> FRAC, 0), 255)
    pa = np.zeros((h + 1) * we, dtype=np.int64)  # channel c's |residuals|, 0 outside
    pz = np.zeros((h + 1) * we, dtype=np.int64)  # channel c's symbols that are the zero point, 0 outside
    older = np.zeros(hw, dtype=np.int64)  # |residuals| of the channels before c, summed
    for c in range(c_count):
        for y in range(h):
            for x in range(w):
                at = c * hw + y * w + x
                pa[_u((y + 1) * we + x + 1)] = abs(sf[_u(at)] - pred[_u(at)])
                pz[_u((y + 1) * we + x + 1)] = sf[_u(at)] == zsym
        for y in range(h):
            for x in range(w):
                here = y * w + x
                at = c * hw + here
                q = (y + 1) * we + x  # left in pa / pz
                e = 2 * pa[_u(q)] + 2 * pa[_u(q - we + 1)] + pa[_u(q - we)] + pa[_u(q - we + 2)]
                z = pz[_u(q)] + pz[_u(q - we + 1)] + pz[_u(q - we)] + pz[_u(q - we + 2)]
                if c > 0:
                    e += 2 * abs(sf[_u(at - hw)] - pred[_u(at - hw)]) + (6 * older[_u(here)]) // c
                    z += sf[_u(at - hw)] == zsym
                    if c > 1:
                        z += sf[_u(at - 2 * hw)] == zsym
                ec = 0
                for j in range(n_energy_edges):
                    if ef_[_u(c * n_energy_edges + j)] <= e:
                        ec += 1
                pr = pred[_u(at)]
                near = min(abs(pr - zsym), N_NEAR - 1)
                r = _u(rank[_u(at)])
                so[r] = sf[_u(at)]
                po[r] = pr
                ko[r] = (c * N_ENERGY + ec) * N_NEAR + near
                zko[r] = ((c * N_NEAR + near) * N_ZERO + min(z, N_ZERO - 1)) * N_ZERO_ENERGY + \
                    ec * N_ZERO_ENERGY // N_ENERGY
                older[_u(here)] += pa[_u(q + 1)]


def _u(i):
    """An index as unsigned (numba adds no negative-index wraparound to unsigned indices; every index here is >= 0)."""
    return np.uint64(i)


def _below(tree, at, j):
    """Events at columns below ``j`` of the row at ``tree[at:]``: those of j's block of 16 columns below j (at + j),
    plus those of earlier blocks (at + 512 + j // 16)."""
    return tree[_u(at + j)] + tree[_u(at + 512 + (j >> 4))]


def _code_kernel(cum, zero, bounds, so, po, ko, zko, zsym, seen, left, freq, words):
    """quantized_all and ans_encode over symbols ``so``, predictions ``po`` and rows ``ko``, ``zko`` in coding
    order, stepping the adaptive counts step by step (``bounds``): ``seen`` (rows x 1024) int32, zeroed here,
    holds per row the events (residual columns seen) below each column within its block of 16 columns (512) and
    below each block (32), so :class:`Adaptive`'s ``now`` at column j is ``cum[row, j] + ADAPT * (events below
    j)``. ``cum``: flat (rows x 512); ``zero``: the zero point's frequency per zero-table row. Writes the words into
    ``words`` (n + 2 uint32) and returns how many."""
    seen[:] = 0
    for t in range(bounds.size - 1):
        a, b = bounds[t], bounds[t + 1]
        for i in range(_u(a), _u(b)):
            s, row = so[i], ko[i]
            col = 255 - po[i]
            cb, tb = row * 512 + col, row * 1024
            base = cum[_u(cb)] + ADAPT * _below(seen, tb, col)
            at_z = cum[_u(cb + zsym)] + ADAPT * _below(seen, tb, col + zsym)
            w_zero = cum[_u(cb + zsym + 1)] + ADAPT * _below(seen, tb, col + zsym + 1) - at_z
            mass = cum[_u(cb + 256)] + ADAPT * _below(seen, tb, col + 256) - base - w_zero
            fz = zero[_u(zko[i])]
            rest = TOTAL - fz
            if s == zsym:
                left[i] = (rest * (at_z - base)) // mass
                freq[i] = fz
            else:
                cw = cum[_u(cb + s)] + ADAPT * _below(seen, tb, col + s) - base
                cw1 = cum[_u(cb + s + 1)] + ADAPT * _below(seen, tb, col + s + 1) - base
                if s > zsym:
                    cw -= w_zero
                if s + 1 > zsym:
                    cw1 -= w_zero
                lo = (rest * cw) // mass
                left[i] = lo + fz if s > zsym else lo
                freq[i] = (rest * cw1) // mass - lo
        for i in range(_u(a), _u(b)):  # the step's residuals count from the next step on (a decoder knows them then)
            s = so[i]
            if s != zsym:
                tb = ko[i] * 1024
                c = s - po[i] + 255
                for q in range(_u(tb + c + 1), _u(tb + (c | 15) + 1)):
                    seen[q] += 1
                for q in range(_u(tb + 512 + (c >> 4) + 1), _u(tb + 544)):
                    seen[q] += 1
    # rANS, last symbol first (constriction's AnsCoder, 64-bit state, 32-bit words, one more count per symbol)
    n = 0
    x = np.uint64(0)
    one, thirty_two, mask = np.uint64(1), np.uint64(32), np.uint64(0xFFFFFFFF)
    prec, top = np.uint64(PRECISION), np.uint64(64 - PRECISION)
    for r in range(so.size):
        i = _u(so.size - 1 - r)
        f = np.uint64(freq[i]) + one
        if (x >> top) >= f:
            words[_u(n)] = np.uint32(x & mask)
            n += 1
            x = x >> thirty_two
        x = ((x // f) << prec) + np.uint64(left[i] + so[i]) + x % f
    while x != np.uint64(0):
        words[_u(n)] = np.uint32(x & mask)
        n += 1
        x = x >> thirty_two
    return n


_KERNELS = []


def _kernels():
    """(image kernel, code kernel) compiled by numba, or None without numba (or with BOARDCODEC_JIT=0)."""
    if not _KERNELS:
        _KERNELS.append(None)
        if os.environ.get("BOARDCODEC_JIT", "1") != "0":
            try:
                import numba
            except Exception:  # not installed, or built for another numpy: the numpy path is the same bytes
                numba = None
            if numba is not None:
                def jit(fn):
                    try:
                        return numba.njit(cache=True, nogil=True)(fn)
                    except RuntimeError:  # no writable cache folder anywhere: compile every process
                        return numba.njit(nogil=True)(fn)

                global _u, _below
                _u = jit(_u)  # the kernels call these: compiled first, inlined there by LLVM
                _below = jit(_below)
                _KERNELS[0] = (jit(_image_kernel), jit(_code_kernel))
    return _KERNELS[0]


def _encode_compiled(kernels, tables, sym):
    image, code = kernels
    sym = np.ascontiguousarray(sym, dtype=np.int64)
    c_count, h, w = sym.shape
    rank, bounds = _coding_rank(c_count, h, w)
    n = sym.size
    so, po, ko, zko = (np.empty(n, dtype=np.int64) for _ in range(4))
    image(sym, _cached(tables, "_fill", lambda t: np.asarray(t["fill"], dtype=np.int64)),
          _cached(tables, "_weights", _padded_weights), tables["grad_edges"], tables["energy_edges"],
          int(tables["zero_symbol"]), rank, so, po, ko, zko)
    cum = _cached(tables, "_cumulative_flat", lambda t: _cumulative(t).reshape(-1))
    seen = _cached(tables, "_seen", lambda t: np.zeros(cum.size * 2, dtype=np.int32))
    fz = _cached(tables, "_zero_freqs", lambda t: _zero_freq(t, np.arange(t["zero"].size // 2)))
    left, freq = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    words = np.empty(n + 2, dtype=np.uint32)
    m = code(cum, fz, bounds, so, po, ko, zko, int(tables["zero_symbol"]), seen, left, freq, words)
    return words[:m].astype("<u4").tobytes()


_RANKS = {}


def _coding_rank(c_count, h, w):
    """(coding position of every image index, each step's first position and the end), cached per shape."""
    key = (c_count, h, w)
    r = _RANKS.get(key)
    if r is None:
        flat, bounds = coding_order(c_count, h, w)
        rank = np.empty(flat.size, dtype=np.int64)
        rank[flat] = np.arange(flat.size)
        if len(_RANKS) >= 8:
            _RANKS.clear()
        r = _RANKS[key] = (rank, np.asarray(bounds, dtype=np.int64))
    return r


def _padded_weights(tables):
    """The predictor's weights (C, N_GRAD, n_features(C - 1)) int64, zero past each channel's own features."""
    wt = np.asarray(tables["weights"], dtype=np.int64)
    out = np.zeros(wt.shape, dtype=np.int64)
    for c in range(wt.shape[0]):
        out[c, :, : n_features(c)] = wt[c, :, : n_features(c)]
    return out


def load(path):
    """Tables from an .npz written by bottlefit (codec/<contract id>.npz; integer arrays only, no pickles): the
    context model's arrays, ``marginal_counts`` and ``contract_id``."""
    with np.load(path, allow_pickle=False) as z:
        t = {k: np.asarray(z[k], dtype=np.int64) for k in TABLE_KEYS + ("marginal_counts",)}
        t["contract_id"] = str(np.asarray(z["contract_id"]).reshape(-1)[0])
    return t


def table_id(marginal_counts, tables):
    """4 bytes naming one fitted model (the frame carries it; a decoder with other tables refuses the frame)."""
    h = hashlib.sha256()
    for a in [marginal_counts] + [tables[k] for k in TABLE_KEYS]:
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.digest()[:4]


# -- the frame (little-endian), one image:
# b"BF" | u8 version<<4 | codec | u8 dtype (0 int8, 1 uint8) | 6 bytes contract id | 4 bytes model-table id
# | u32 crc32 of the symbols | f32 scale | i16 zero_point | u8 ndim | u16 x ndim shape | payload

MAGIC = b"BF"
VERSION = 1
CODECS = ("raw", "zstd", "entropy", "context")
DTYPES = ("int8", "uint8")
HEADER = struct.Struct("<2sBB6s4sIfhB")


def pack_header(codec, dtype, contract_id, table, sym, scale, zero_point, shape):
    """The frame header for symbols ``sym`` (C, H, W uint8) of codes of ``shape`` (the contract's layout)."""
    head = HEADER.pack(MAGIC, VERSION << 4 | CODECS.index(codec), DTYPES.index(dtype), bytes.fromhex(contract_id),
                       table, zlib.crc32(np.ascontiguousarray(sym, dtype=np.uint8).tobytes()) & 0xFFFFFFFF,
                       float(scale), int(zero_point), len(shape))
    return head + struct.pack("<" + "H" * len(shape), *shape)


def symbols(codes, dtype, layout):
    """One image's codes in the contract's layout (C,H,W or H,W,C; batch 1 allowed) -> uint8 symbols C,H,W."""
    c = np.asarray(codes)
    if c.ndim == 4:
        c = c[0]
    if layout == "NHWC":
        c = c.transpose(2, 0, 1)
    s = c.astype(np.int16) + (128 if dtype == "int8" else 0)
    return np.ascontiguousarray(s.astype(np.uint8))


def context_frame(tables, codes, dtype, layout, scale, zero_point):
    """One image's codes -> a ``context`` frame (what the board sends; ``bottlefit serve`` decodes it)."""
    sym = symbols(codes, dtype, layout)
    shape = np.asarray(codes).shape[-3:]
    tid = _cached(tables, "_table_id", lambda t: table_id(t["marginal_counts"], t))
    return pack_header("context", dtype, tables["contract_id"], tid, sym, scale, zero_point, shape) + \
        encode(tables, sym)


MARGINAL_FLOOR = 1e-3  # pseudo-count per symbol in the ``entropy`` codec's channel marginal


def marginal(marginal_counts):
    """The ``entropy`` codec's per-channel probabilities (C, 256) float64 from the integer counts."""
    m = np.asarray(marginal_counts).astype(np.float64) + MARGINAL_FLOOR
    return m / m.sum(axis=1, keepdims=True)


def parse_header(frame):
    """A frame's header -> (codec, dtype, contract id hex, model-table id, crc32, scale, zero point, shape, header
    bytes). Raises ValueError for anything that is not a frame of this version."""
    if len(frame) < HEADER.size:
        raise ValueError(f"frame of {len(frame)} bytes is shorter than its {HEADER.size}-byte header")
    magic, vc, dt, cid, tid, crc, scale, zp, ndim = HEADER.unpack_from(frame)
    if magic != MAGIC or vc >> 4 != VERSION:
        raise ValueError("not a bottlefit wire frame (bad magic or version)")
    if (vc & 15) >= len(CODECS) or dt >= len(DTYPES):
        raise ValueError(f"unknown codec id {vc & 15} or dtype id {dt}")
    end = HEADER.size + 2 * ndim
    if ndim > 8 or len(frame) < end:
        raise ValueError("frame header truncated")
    shape = struct.unpack_from(f"<{ndim}H", frame, HEADER.size)
    return CODECS[vc & 15], DTYPES[dt], cid.hex(), tid, crc, scale, zp, tuple(shape), end


def check_frame(dtype, shape, scale, zero_point, contract):
    """A frame header's dtype, shape, scale and zero point against the contract it names (a mapping with
    contract_id, dtype, shape, scale, zero_point): ValueError when they disagree. The server and Triton's decode
    step both judge frames by this."""
    cid = contract["contract_id"]
    if dtype != contract["dtype"] or tuple(shape) != tuple(contract["shape"]):
        raise ValueError(f"frame says {dtype}{list(shape)}, contract {cid} is {contract['dtype']}"
                         f"{list(contract['shape'])}")
    if np.float32(scale) != np.float32(contract["scale"]) or zero_point != contract["zero_point"]:
        raise ValueError(f"frame's scale/zero point {scale}/{zero_point} differ from contract {cid}'s "
                         f"{contract['scale']}/{contract['zero_point']}")


def check_crc(codec, symbols, crc):
    """Decoded symbols against the frame's crc32: ValueError for a damaged stream."""
    if zlib.crc32(symbols.tobytes()) != crc:
        raise ValueError(f"invalid {codec} stream: decoded codes fail the frame's crc32")


def context_decode(payload, shape, tables, cum=None):
    """A ``context`` stream -> symbols (C, H, W) uint8, decoded by constriction one step (every active channel's
    wavefront) at a time: one vectorized prediction, context and frequency computation and one constriction
    call per step. ``cum``: :func:`cumulative` of the tables, when cached."""
    import constriction

    c_count, h, w = shape
    model = Adaptive(tables, cum)
    bm = Batched(tables, plan(c_count, h, w))
    pl = bm.plan
    family = constriction.stream.model.Categorical(perfect=False)
    dec = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    sym, ares = bm.buffers()
    for a, b in zip(pl.bounds[:-1].tolist(), pl.bounds[1:].tolist()):  # noqa: B905 - Python 3.6 on the board
        p = bm.predict(sym, a, b)
        k, zk = bm.contexts(sym, ares, p, a, b)
        freq = alphabet_frequencies(tables, model.window(k, p), zk)
        got = np.asarray(dec.decode(family, freq.astype(np.float64)), dtype=np.int64)
        model.update(k, p, got)
        at = pl.flat[a:b]
        sym[at] = got
        ares[at] = np.abs(got - p)
    return sym[: pl.n].reshape(shape).astype(np.uint8)


def decode_symbols(codec, payload, shape, tables=None, cum=None):
    """A frame's payload -> the image's symbols (C, H, W) uint8, bit-exact. ``tables``: the context model's arrays
    and ``marginal_counts`` (``entropy`` and ``context``). Raises ValueError for a damaged stream."""
    c, h, w = shape
    n = c * h * w
    if codec == "raw":
        if len(payload) != n:
            raise ValueError(f"raw payload has {len(payload)} bytes, expected {n}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(shape).copy()
    if codec == "zstd":
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise ValueError(f"invalid zstd stream ({e})") from None
        if len(data) != n:
            raise ValueError(f"zstd stream holds {len(data)} bytes, expected {n}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()
    import constriction

    if tables is None:
        raise ValueError(f"codec {codec!r} is not available here (no fitted tables)")
    if len(payload) % 4 or (not payload and codec == "entropy"):  # rANS of all-certain symbols may be empty
        raise ValueError(f"{codec} stream of {len(payload)} bytes is not a whole number of 32-bit words")
    family = constriction.stream.model.Categorical(perfect=False)
    try:
        if codec == "entropy":
            dec = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
            probs = np.repeat(marginal(tables["marginal_counts"]), h * w, axis=0)
            return np.asarray(dec.decode(family, probs), dtype=np.uint8).reshape(shape)
        return context_decode(payload, shape, tables, cum)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise ValueError(f"invalid {codec} stream ({e})") from None
