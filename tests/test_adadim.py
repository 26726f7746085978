"""AdaDim's pure math: group grids in both layouts (ragged too), clip search, GPTQ, the layout criterion, config errors."""

from __future__ import annotations

import pytest
import torch

from hf_outliertune import OutlierTuneConfig
from hf_outliertune import adadim as ad


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outlier_layer(seed: int = 0, n: int = 96, k: int = 160, tokens: int = 2048):
    """A layer whose inputs are correlated and have a few outlier channels whose weight columns are also large
    (the pattern per-IC groups isolate); returns (W, X, H = XᵀX)."""
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :4] *= 20.0
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 4:8] *= 10.0
    return w, x, x.t() @ x


def _rel_out_err(q: ad.GroupQuantized, w: torch.Tensor, h: torch.Tensor) -> float:
    return ad.output_error(q.dequantize() - w, h) / ad.output_error(w, h)


@pytest.mark.parametrize("group_dim", ["oc", "ic"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_layouts_shapes_range_and_half_step_error(bits, group_dim):
    n, k, g = 40, 70, 16  # both dimensions ragged: 40 = 2·16 + 8, 70 = 4·16 + 6
    w = torch.randn(n, k, generator=_gen(bits)) * 0.05
    q = ad.quantize_rtn(w, bits, g, group_dim)
    expected = (n, 5) if group_dim == "oc" else (3, k)
    assert q.scale.shape == q.zero.shape == expected
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.codes.dtype == torch.uint8
    assert q.codes.shape == (n, k) and int(q.codes.max()) == ad.max_code(bits)
    assert torch.equal(q.zero, q.zero.round()) and q.zero.min() >= 0 and q.zero.max() <= ad.max_code(bits)
    step = ad.expand_groups(q.scale, g, group_dim, (n, k))
    err = (w - q.dequantize()).abs()
    assert torch.all(err <= step * 0.5 * (1 + 1e-4))  # round to nearest on a grid that covers every value


@pytest.mark.parametrize("group_dim", ["oc", "ic"])
def test_codes_are_computed_with_the_stored_fp16_scales(group_dim):
    w = torch.randn(48, 80, generator=_gen(1))
    q = ad.quantize_rtn(w, 3, 32, group_dim)
    s = ad.expand_groups(q.scale, 32, group_dim, (48, 80))
    z = ad.expand_groups(q.zero, 32, group_dim, (48, 80))
    assert torch.equal(q.codes.float(), torch.clamp(torch.round(w / s) + z, 0, 7))
    assert torch.equal(q.dequantize(), ad.dequantize(q.codes, q.scale, q.zero, 32, group_dim))


def test_group_index_maps_follow_the_contract():
    """oc: group [n, k // g]; ic: group [n // g, k] — checked on a weight whose groups have distinct ranges."""
    n, k, g = 24, 40, 16
    rows = torch.arange(n, dtype=torch.float32)[:, None]
    cols = torch.arange(k, dtype=torch.float32)[None, :]
    w_oc = (torch.rand(n, k, generator=_gen(2)) - 0.5) * (1 + rows + 100 * (cols // g))
    q = ad.quantize_rtn(w_oc, 4, g, "oc")
    for nn_, gk in [(0, 0), (5, 1), (23, 2)]:  # group 2 is ragged: columns 32..39
        block = w_oc[nn_, gk * g : (gk + 1) * g]
        span = block.max().clamp(min=0) - block.min().clamp(max=0)
        assert q.scale[nn_, gk].float() == pytest.approx(float(span) / 15, rel=1e-3)
    q = ad.quantize_rtn(w_oc.t().contiguous(), 4, g, "ic")  # the transpose's column groups are w_oc's row groups
    assert torch.equal(q.scale, ad.quantize_rtn(w_oc, 4, g, "oc").scale.t())


def test_per_ic_isolates_a_large_input_channel_and_per_oc_does_not():
    w = torch.randn(64, 64, generator=_gen(3)) * 0.02
    w_big = w.clone()
    w_big[:, 5] *= 50.0  # one input channel's column
    for dim, changed in [("ic", lambda a, b: (a != b).any(dim=0)), ("oc", lambda a, b: (a != b).any(dim=1))]:
        before = ad.quantize_rtn(w, 4, 32, dim).scale
        after = ad.quantize_rtn(w_big, 4, 32, dim).scale
        moved = changed(before, after)
        if dim == "ic":
            assert moved.nonzero().flatten().tolist() == [5]  # only column 5's own groups
        else:
            assert moved.float().mean() > 0.9  # nearly every row's group containing column 5
    err_ic = (ad.quantize_rtn(w_big, 4, 32, "ic").dequantize() - w_big)[:, torch.arange(64) != 5].pow(2).sum()
    err_oc = (ad.quantize_rtn(w_big, 4, 32, "oc").dequantize() - w_big)[:, torch.arange(64) != 5].pow(2).sum()
    assert err_ic < 0.05 * err_oc  # the other channels keep their resolution


@pytest.mark.parametrize("group_dim", ["oc", "ic"])
def test_clip_search_never_loses_to_minmax(group_dim):
    w, x, h = _outlier_layer(4)
    u = torch.rand(32, w.shape[1], generator=_gen(12)) - 0.5
    w = torch.cat([w, -0.02 * u.sign() * torch.log1p(-2 * u.abs())])  # Laplace rows: heavy tails
    sq = torch.diag(h) / x.shape[0]
    plain = ad.quantize_rtn(w, 3, 32, group_dim)
    clipped = ad.quantize_rtn(w, 3, 32, group_dim, clip=True, input_sq=sq)
    # the search minimises the activation-weighted error per group, of which the ratio-1.0 grid is a candidate
    weight = sq[None, :] if group_dim == "oc" else torch.ones_like(sq)[None, :]
    e_plain = ((plain.dequantize() - w).pow(2) * weight).sum()
    e_clip = ((clipped.dequantize() - w).pow(2) * weight).sum()
    assert e_clip <= e_plain
    assert e_clip < {"oc": 0.7, "ic": 0.95}[group_dim] * e_plain  # measured 0.47 (oc), 0.89 (ic)


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
    """With a diagonal Hessian no error can be compensated, so GPTQ must round exactly like RTN."""
    w = torch.randn(40, 70, generator=_gen(5))
    h = torch.diag(torch.rand(70, generator=_gen(6)) + 0.5)
    for dim in ("oc", "ic"):
        rtn = ad.quantize_rtn(w, 3, 16, dim)
        for act_order in (True, False):
            gptq = ad.quantize_gptq(w, h, 3, 16, dim, damp=0.01, act_order=act_order)
            assert torch.equal(gptq.codes, rtn.codes), (dim, act_order)
            assert torch.equal(gptq.scale, rtn.scale) and torch.equal(gptq.zero, rtn.zero)


@pytest.mark.parametrize("group_dim", ["oc", "ic"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_reduces_output_error_on_outlier_inputs(bits, group_dim):
    w, _x, h = _outlier_layer(7)
    rtn = _rel_out_err(ad.quantize_rtn(w, bits, 32, group_dim), w, h)
    for act_order in (True, False):
        q = ad.quantize_gptq(w, h, bits, 32, group_dim, damp=0.01, act_order=act_order)
        assert q.scale.shape == ad.quantize_rtn(w, bits, 32, group_dim).scale.shape
        gptq = _rel_out_err(q, w, h)
        assert gptq < 0.7 * rtn, (act_order, gptq, rtn)  # measured 0.22-0.54x


def test_gptq_ragged_groups_and_dead_inputs():
    w, x, _ = _outlier_layer(8, n=40, k=70)
    x[:, 9] = 0.0  # an input channel that never fires
    h = x.t() @ x
    for dim in ("oc", "ic"):
        q = ad.quantize_gptq(w, h, 4, 16, dim, clip=True)
        assert torch.isfinite(q.dequantize()).all()
        assert torch.all(q.dequantize()[:, 9] == 0)  # dead columns are dropped, as in GPTQ
        assert _rel_out_err(q, w, h) < _rel_out_err(ad.quantize_rtn(w, 4, 16, dim), w, h)


def test_output_error_is_the_squared_output_difference():
    w, x, _ = _outlier_layer(9, n=16, k=24, tokens=64)
    delta = torch.randn_like(w) * 0.01
    direct = float((x.double() @ delta.double().t()).pow(2).sum())
    assert ad.output_error(delta, x.double().t() @ x.double()) == pytest.approx(direct, rel=1e-9)


def test_pick_layout_takes_the_lower_error_and_oc_on_ties():
    assert ad.pick_layout({"oc": 2.0, "ic": 1.0}) == "ic"
    assert ad.pick_layout({"oc": 1.0, "ic": 2.0}) == "oc"
    assert ad.pick_layout({"oc": 1.0, "ic": 1.0}) == "oc"


def test_criterion_picks_per_ic_for_outlier_columns_and_per_oc_for_outlier_rows():
    w, _x, h = _outlier_layer(10)
    errors = {d: ad.output_error(ad.quantize_rtn(w, 3, 32, d).dequantize() - w, h) for d in ad.GROUP_LAYOUTS}
    assert ad.pick_layout(errors) == "ic"
    w_rows = torch.randn(96, 160, generator=_gen(11)) * 0.02
    w_rows[4:8] *= 10.0  # large output rows: per-OC keeps them in their own groups
    h_plain = torch.eye(160)
    errors = {d: ad.output_error(ad.quantize_rtn(w_rows, 3, 32, d).dequantize() - w_rows, h_plain)
              for d in ad.GROUP_LAYOUTS}
    assert ad.pick_layout(errors) == "oc"


def test_bad_layout_and_too_wide_group_are_refused():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="group_dim='adaptive'"):
        ad.quantize_rtn(w, 4, 16, "adaptive")
    for layout in ("oc", "ic"):
        with pytest.raises(ValueError, match="fp16"):
            ad.quantize_rtn(w * 1e7, 2, 16, layout)
        with pytest.raises(ValueError, match="fp16"):
            ad.quantize_gptq(w * 1e7, torch.eye(16), 2, 16, layout)
    nan = w.clone()
    nan[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ad.quantize_rtn(nan, 4, 16, "ic")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight_bits=2), "act_bits=None"),
        (dict(weight_bits=3, act_bits=8), "act_bits=None"),
        (dict(weight_bits=6, act_bits=None), "weight_bits=6"),
        (dict(act_bits=None, weight_bits=4, group_size=96), "power of two"),
        (dict(act_bits=None, weight_bits=4, group_size=8), "group_size"),
        (dict(act_bits=None, weight_bits=4, group_size=2048), "group_size"),
        (dict(act_bits=None, weight_bits=4, group_size=64.0), "group_size"),
        (dict(act_bits=None, weight_bits=4, group_dim="row"), "group_dim"),
        (dict(act_bits=None, weight_bits=4, weight_clip="max"), "weight_clip"),
        (dict(act_bits=None, weight_bits=4, weight_algorithm="mse"), "weight_clip='mse'"),
        (dict(act_bits=None, weight_bits=4, weight_algorithm="absmax"), "weight_algorithm"),
        (dict(weight_algorithm="rtn"), "weight-only"),
        (dict(group_size=64), "only applies to weight-only"),
        (dict(group_dim="ic"), "only applies to weight-only"),
        (dict(weight_clip="mse"), "only applies to weight-only"),
        (dict(act_order=False), "act_order"),
        (dict(act_bits=None, weight_bits=4, act_order=1), "act_order"),
        (dict(act_bits="none"), "act_bits"),
        (dict(act_bits=None, weight_bits=3, refit_rounds=-1), "refit_rounds"),
        (dict(act_bits=None, weight_bits=3, refit_rounds=True), "refit_rounds"),
        (dict(act_bits=None, weight_bits=3, refit_rounds=1.0), "refit_rounds"),
        (dict(refit_rounds=1), "only applies to weight-only"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_config_refuses_bad_weight_only_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OutlierTuneConfig(**kwargs)


def test_config_weight_only_defaults_and_round_trip():
    cfg = OutlierTuneConfig(act_bits=None, weight_bits=3)
    assert cfg.weight_only and not cfg.uses_static_activations
    assert (cfg.group_size, cfg.group_dim, cfg.weight_clip, cfg.act_order) == (128, "adaptive", "mse", True)
    assert cfg.gptq_damp == 0.01 and OutlierTuneConfig().gptq_damp == 0.1  # per-mode GPTQ damping defaults
    assert cfg.refit_rounds == 2 and cfg.needs_calibration
    data_free = OutlierTuneConfig(act_bits=None, weight_bits=4, weight_algorithm="rtn", group_dim="oc",
                                  weight_clip="minmax")
    assert data_free.refit_rounds == 0 and not data_free.needs_calibration  # stays data-free by default
    assert OutlierTuneConfig(act_bits=None, weight_bits=4, weight_algorithm="rtn", group_dim="oc",
                             weight_clip="minmax", refit_rounds=1).needs_calibration
    back = OutlierTuneConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    w8a8 = OutlierTuneConfig()
    assert not w8a8.weight_only and w8a8.group_size is None and w8a8.group_dim is None
    # a version-1 W8A8 config.json (no weight-only keys) still loads
    old = {k: v for k, v in w8a8.to_dict().items() if k not in ("group_size", "group_dim", "weight_clip", "act_order")}
    old["format_version"] = 1
    assert OutlierTuneConfig.from_dict(old).weight_bits == 8


def test_clip_search_in_row_chunks_matches_one_pass(monkeypatch):
    w = torch.randn(40, 70, generator=_gen(13))
    whole = ad.row_group_params(w, 3, 16, clip=True)
    monkeypatch.setattr(ad, "_CLIP_CHUNK", 1)  # one row at a time
    chunked = ad.row_group_params(w, 3, 16, clip=True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("group_dim", ["oc", "ic"])
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_refit_keeps_codes_and_never_raises_any_units_error(algorithm, group_dim):
    w, _, h = _outlier_layer(seed=5, n=80, k=144)  # ragged last groups along both dimensions (g = 64)
    if algorithm == "gptq":
        q = ad.quantize_gptq(w, h, 3, 64, group_dim, clip=True)
    else:
        q = ad.quantize_rtn(w, 3, 64, group_dim, clip=True, input_sq=torch.diag(h) / 2048)
    r = ad.refit_group_params(q, w, h)
    assert torch.equal(r.codes, q.codes) and r.scale.dtype == r.zero.dtype == torch.float16
    assert r.scale.shape == q.scale.shape and bool((r.scale > 0).all())

    def unit_errors(g: ad.GroupQuantized) -> torch.Tensor:
        d = (g.dequantize() - w).double()
        rows = ((d @ h.double()) * d).sum(dim=1)
        return rows if group_dim == "oc" else ad._group_sum(rows[:, None], 64, "ic")[:, 0]

    before, after = unit_errors(q), unit_errors(r)
    assert bool((after <= before).all())  # a unit keeps its old grid unless the refit lowers its error
    assert float(after.sum()) < 0.97 * float(before.sum())  # and on this layer the refit does lower it
    assert not torch.equal(r.zero, r.zero.round())  # the refitted zero points are fractional


def test_refit_solves_the_least_squares_problem_exactly_on_a_small_layer():
    """On a layer small enough to solve the normal equations directly, the refit reaches their optimum."""
    g = _gen(3)
    n, k, gs = 2, 32, 16
    w = torch.randn(n, k, generator=g)
    x = torch.randn(256, k, generator=g)
    h = x.t() @ x
    q = ad.quantize_rtn(w, 3, gs, "oc")
    r = ad.refit_group_params(q, w, h, iterations=200)
    for row in range(n):  # Ŵ = A θ with θ = (s_1, s_2, c_1, c_2): the optimum is (AᵀHA)⁻¹ AᵀH w
        codes = q.codes[row].double()
        a = torch.zeros(k, 4, dtype=torch.float64)
        for grp in range(2):
            a[grp * gs : (grp + 1) * gs, grp] = codes[grp * gs : (grp + 1) * gs]
            a[grp * gs : (grp + 1) * gs, 2 + grp] = -1.0
        hd = h.double()
        theta = torch.linalg.solve(a.t() @ hd @ a, a.t() @ hd @ w[row].double())
        best = float(((a @ theta - w[row]) @ hd @ (a @ theta - w[row])))
        got = r.dequantize()[row].double() - w[row].double()
        assert float(got @ hd @ got) <= best * 1.01 + 1e-9  # up to the fp16 rounding of scale and zero


def test_quantize_weight_rounds_and_data_free_rtn():
    w, _, h = _outlier_layer(seed=7, n=64, k=128)
    errors = [_rel_out_err(ad.quantize_weight(w, h, 2048, 3, 32, "oc", "gptq", True, rounds), w, h)
              for rounds in (0, 1, 2)]
    assert errors[1] < errors[0] and errors[2] < errors[0]
    plain = ad.quantize_weight(w, None, 0, 4, 32, "ic", "rtn")
    assert torch.equal(plain.codes, ad.quantize_rtn(w, 4, 32, "ic").codes)
    with pytest.raises(ValueError, match="Hessian"):
        ad.quantize_weight(w, None, 0, 4, 32, "ic", "rtn", refit_rounds=1)
    with pytest.raises(ValueError, match="algorithm"):
        ad.quantize_weight(w, h, 2048, 4, 32, "ic", "awq")
