import math

import pytest
import torch

from mechir.attribution.integration import METHODS, integration_rule, parse_method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [2, 5, 16])
def test_rules_are_consistent_quadratures(method, n_steps):
    rule = integration_rule(method, n_steps)
    assert rule.n_steps == n_steps == len(rule.weights)
    assert torch.all(rule.weights > 0)
    assert float(rule.weights.sum()) == pytest.approx(1.0, abs=1e-14)
    assert torch.all(rule.alphas[1:] > rule.alphas[:-1])
    assert 0.0 <= float(rule.alphas[0]) and float(rule.alphas[-1]) <= 1.0
    # cells [b_{k-1}, b_k] have width w_k and contain their node
    b = rule.breakpoints
    assert float(b[0]) == 0.0 and float(b[-1]) == 1.0
    torch.testing.assert_close(b[1:] - b[:-1], rule.weights, rtol=0, atol=1e-14)
    assert torch.all(b[:-1] <= rule.alphas) and torch.all(rule.alphas <= b[1:])


def test_known_nodes():
    assert integration_rule("riemann_right", 4).alphas.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert integration_rule("riemann_left", 4).alphas.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert integration_rule("riemann_middle", 2).alphas.tolist() == [0.25, 0.75]
    trap = integration_rule("riemann_trapezoid", 3)
    assert trap.alphas.tolist() == [0.0, 0.5, 1.0]
    assert trap.weights.tolist() == [0.25, 0.5, 0.25]
    gl = integration_rule("gauss_legendre", 2)
    torch.testing.assert_close(
        gl.alphas, torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)]).double()
    )


@pytest.mark.parametrize("n", [1, 3, 6])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n):
    rule = integration_rule("gauss_legendre", n)
    for degree in range(2 * n):
        exact = 1.0 / (degree + 1)
        assert float(rule.integrate(rule.alphas**degree)) == pytest.approx(exact, abs=1e-13)
    # and not beyond
    assert float(rule.integrate(rule.alphas ** (2 * n))) != pytest.approx(1 / (2 * n + 1))


def test_error_orders_on_a_smooth_integrand():
    f = torch.exp
    exact = math.e - 1
    err = {
        (m, n): abs(
            float(integration_rule(m, n).integrate(f(integration_rule(m, n).alphas))) - exact
        )
        for m in METHODS
        for n in (8, 16)
    }
    # error ~ h for left/right, ~ h^2 for middle/trapezoid (h = 1/n, trapezoid 1/(n-1))
    for m in ("riemann_left", "riemann_right"):
        assert err[(m, 8)] / err[(m, 16)] == pytest.approx(2, rel=0.1)
    assert err[("riemann_middle", 8)] / err[("riemann_middle", 16)] == pytest.approx(4, rel=0.05)
    trap = err[("riemann_trapezoid", 8)] / err[("riemann_trapezoid", 16)]
    assert trap == pytest.approx((15 / 7) ** 2, rel=0.05)
    assert err[("gauss_legendre", 8)] < 1e-12 < err[("riemann_middle", 16)]


def test_points_merge_nodes_and_breakpoints():
    right = integration_rule("riemann_right", 4)
    points, node_index, break_index = right.points()
    assert points.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert node_index.tolist() == [1, 2, 3, 4]
    assert break_index.tolist() == [0, 1, 2, 3, 4]
    middle_points, _, _ = integration_rule("riemann_middle", 2).points()
    assert middle_points.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_aliases_and_errors():
    assert parse_method("Trapezoid") == "riemann_trapezoid"
    assert parse_method("gausslegendre") == "gauss_legendre"
    with pytest.raises(ValueError, match="unknown integration method 'simpson'"):
        integration_rule("simpson", 4)
    with pytest.raises(ValueError, match="positive int"):
        integration_rule("riemann_right", 0)
    with pytest.raises(ValueError, match="n_steps >= 2"):
        integration_rule("riemann_trapezoid", 1)
