"""Verify serving, pure part: endpoints, deadlines, SNI, addresses, backoff, wording, verdicts."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.budget import worst_case
from worker.core.serving import (
    DEFAULT_DEADLINE_SECONDS,
    MAX_DEADLINE_SECONDS,
    MAX_ENDPOINTS,
    Endpoint,
    EndpointResult,
    ServingConfigError,
    ServingState,
    address_problem,
    default_sni,
    delay_after,
    not_serving_message,
    parse_deadline,
    parse_endpoint,
    parse_endpoints,
    serving_lines,
    summarise,
    verification_window,
)

# ----------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("shop.example.com:443", Endpoint("shop.example.com", 443)),
        ("  Shop.Example.COM.:8443 ", Endpoint("shop.example.com", 8443)),
        ("10.0.0.5:443", Endpoint("10.0.0.5", 443)),
        ("[2001:db8::1]:443", Endpoint("2001:db8::1", 443)),
        ("[2001:DB8:0::1]:1", Endpoint("2001:db8::1", 1)),
        ("lb:65535,sni=shop.example.com", Endpoint("lb", 65535, "shop.example.com")),
        ("lb:443, SNI = Shop.Example.com", Endpoint("lb", 443, "shop.example.com")),
        ("127.0.0.1:8443", Endpoint("127.0.0.1", 8443)),
    ],
)
def test_endpoints_parse_to_their_canonical_form(text: str, expected: Endpoint) -> None:
    parsed = parse_endpoint(text)
    assert parsed == expected
    assert parse_endpoint(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty endpoint"),
        ("shop.example.com", "give host:port with the port"),
        (":443", "give host:port with the port"),
        ("https://shop.example.com:443", "not a URL"),
        ("shop.example.com:443/path", "not a URL"),
        ("shop.example.com:0", "not a port number from 1 to 65535"),
        ("shop.example.com:65536", "not a port number from 1 to 65535"),
        ("shop.example.com:-1", "not a port number"),
        ("shop.example.com:https", "not a port number"),
        ("shop.example.com:", "not a port number"),
        ("2001:db8::1:443", "IPv6 address goes in brackets"),
        ("[2001:db8::1]443", "written [address]:port"),
        ("[10.0.0.1]:443", "is not an IPv6 address"),
        ("shop_example.com:443", "is not a DNS label"),
        ("-shop.example.com:443", "is not a DNS label"),
        ("300.1.1.1:443", "looks like an IP address"),
        ("lb:443,sni=", "is not a DNS label"),
        ("lb:443,sni=10.0.0.1", "must be a host name"),
        ("lb:443,sni=*.example.com", "must be a host name"),
        ("lb:443,port=1", "unknown option"),
        ("lb:443,sni=a.com,sni=b.com", "sni= given twice"),
    ],
)
def test_bad_endpoints_are_refused_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(ServingConfigError, match=None) as caught:
        parse_endpoint(text)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.0.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not a globally routable"),
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_public_only_targets_refuse_non_public_addresses(address: str, kind: str) -> None:
    problem = address_problem(address)
    assert problem is not None and kind in problem
    shown = f"[{address}]:443" if ":" in address else f"{address}:443"
    with pytest.raises(ServingConfigError) as caught:
        parse_endpoint(shown, public_only=True)
    assert "requires public endpoints" in str(caught.value)
    assert kind in str(caught.value)
    parse_endpoint(shown)  # allowed when the target does not ask for public only


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_and_host_names_pass_public_only(address: str) -> None:
    assert address_problem(address) is None
    shown = f"[{address}]:443" if ":" in address else f"{address}:443"
    parse_endpoint(shown, public_only=True)
    # A host name is checked when it is resolved, at probe time.
    parse_endpoint("internal.example.com:443", public_only=True)


@given(st.ip_addresses())
def test_only_globally_routable_addresses_pass_public_only(ip: ipaddress._BaseAddress) -> None:
    effective = ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        effective = ip.ipv4_mapped
    # Stricter than ipaddress where it must be (it calls reserved ::2 global on 3.11).
    if address_problem(str(ip)) is None:
        assert effective.is_global and not effective.is_reserved


@given(st.integers(min_value=-100000, max_value=100000))
def test_only_ports_from_1_to_65535_are_accepted(port: int) -> None:
    if 1 <= port <= 65535:
        assert parse_endpoint(f"lb.example.com:{port}").port == port
    else:
        with pytest.raises(ServingConfigError, match="not a port number"):
            parse_endpoint(f"lb.example.com:{port}")


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_with_a_serving_error(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except ServingConfigError as exc:
        assert str(exc)
        return
    assert 1 <= endpoint.port <= 65535
    assert parse_endpoint(str(endpoint)) == endpoint


def test_a_target_names_at_most_max_endpoints_each_once() -> None:
    many = [f"lb{i}.example.com:443" for i in range(MAX_ENDPOINTS)]
    assert len(parse_endpoints(many)) == MAX_ENDPOINTS
    with pytest.raises(ServingConfigError, match=f"at most {MAX_ENDPOINTS}"):
        parse_endpoints([*many, "one-more.example.com:443"])
    with pytest.raises(ServingConfigError, match="listed twice"):
        parse_endpoints(["LB.example.com:443", "lb.example.com.:443"])


# ------------------------------------------------------------------------------ deadline


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120), (120, 120), ("90s", 90), ("2m", 120), (" 5s ", 5), ("1", 1), ("10m", 600)],
)
def test_deadlines_are_seconds_or_minutes(value: str | int, seconds: int) -> None:
    assert parse_deadline(value) == seconds


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0", "from 1 s to"),
        ("601", "from 1 s to"),
        ("11m", "from 1 s to"),
        ("5h", "whole seconds or minutes"),
        ("1.5", "whole seconds or minutes"),
        ("-5", "whole seconds or minutes"),
        ("", "whole seconds or minutes"),
        ("soon", "whole seconds or minutes"),
    ],
)
def test_bad_deadlines_are_refused(value: str, says: str) -> None:
    with pytest.raises(ServingConfigError) as caught:
        parse_deadline(value)
    assert says in str(caught.value)


@given(st.integers(min_value=-10, max_value=2000))
def test_a_deadline_is_accepted_exactly_within_its_range(seconds: int) -> None:
    if 1 <= seconds <= MAX_DEADLINE_SECONDS:
        assert parse_deadline(f"{seconds}s") == seconds
    else:
        with pytest.raises(ServingConfigError):
            parse_deadline(f"{seconds}s")


@given(
    configured=st.integers(min_value=1, max_value=MAX_DEADLINE_SECONDS),
    left=st.floats(min_value=-1000, max_value=1000, allow_nan=False),
)
def test_the_verification_window_never_exceeds_the_deadline_or_the_time_left(
    configured: int, left: float
) -> None:
    window, cut = verification_window(configured, seconds_left=left)
    assert 0 <= window <= configured
    assert window <= max(left, 0)
    assert cut == (window < configured)


def test_verification_ends_before_the_soft_limit_leaves_too_little_to_record() -> None:
    # The default retry settings: the closing steps (3 x 20 s) are kept out of the window.
    worst = worst_case(attempts=5, retry_max_seconds=30, connect_timeout=5, read_timeout=15)
    assert worst.serving_end(600) == 600 - worst.after_targets == 540
    # A message whose writes took 10 s still has the whole default deadline.
    assert verification_window(DEFAULT_DEADLINE_SECONDS, seconds_left=540 - 10) == (120, False)
    # One whose writes took 500 s is cut to the 40 s left, and says so.
    assert verification_window(DEFAULT_DEADLINE_SECONDS, seconds_left=540 - 500) == (40, True)


# ----------------------------------------------------------------------------------- SNI


@pytest.mark.parametrize(
    ("cn", "sans", "sni"),
    [
        ("shop.example.com", ("shop.example.com", "www.example.com"), "shop.example.com"),
        (None, ("api.example.com",), "api.example.com"),
        ("*.example.com", ("*.example.com", "example.com"), "example.com"),
        ("*.example.com", ("*.example.com",), None),
        ("10.0.0.1", ("10.0.0.1",), None),
        ("Not A Hostname", ("Shop.Example.com",), "shop.example.com"),
        (None, (), None),
    ],
)
def test_the_default_sni_is_the_cn_or_first_usable_san(
    cn: str | None, sans: tuple[str, ...], sni: str | None
) -> None:
    assert default_sni(cn, sans) == sni


# ------------------------------------------------------------------------------- backoff


def test_backoff_doubles_from_half_a_second_up_to_ten() -> None:
    assert [delay_after(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    with pytest.raises(ValueError):
        delay_after(0)


@given(st.integers(min_value=1, max_value=10_000))
def test_backoff_is_bounded_and_never_shrinks(attempt: int) -> None:
    assert 0.5 <= delay_after(attempt) <= 10
    assert delay_after(attempt + 1) >= delay_after(attempt)


@given(st.floats(min_value=1, max_value=MAX_DEADLINE_SECONDS))
def test_attempts_within_a_deadline_are_few(deadline: float) -> None:
    # The number of handshakes a deadline costs at most (the cost note's "per endpoint").
    spent, attempts = 0.0, 0
    while spent < deadline:
        attempts += 1
        spent += delay_after(attempts)
    assert attempts <= 5 + deadline / 10 + 1


# ------------------------------------------------------------------------------- wording

NOT_AFTER = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("result", "line"),
    [
        (
            EndpointResult("lb:443", ServingState.VERIFIED, 3.2, 2, "1a", NOT_AFTER),
            "verified after 3.2 s",
        ),
        (
            EndpointResult("lb:443", ServingState.VERIFIED, 0.013, 1, "1a", NOT_AFTER),
            "verified after 0.01 s",
        ),
        (
            EndpointResult(
                "lb:443", ServingState.VERIFIED, 12.4, 5, "1a", NOT_AFTER, chain="valid"
            ),
            "verified after 12 s; chain valid",
        ),
        (
            EndpointResult("lb:443", ServingState.STALE, 5.04, 5, "0bad", NOT_AFTER),
            "still serving serial 0bad (not-after 2027-01-01 00:00Z) after 5.0 s",
        ),
        (
            EndpointResult("lb:443", ServingState.UNREACHABLE, 5.0, 4, reason="connection refused"),
            "unreachable: connection refused (after 5.0 s, 4 attempts)",
        ),
        (
            EndpointResult("lb:443", ServingState.UNREACHABLE, 0.1, 1, reason="timed out"),
            "unreachable: timed out (after 0.10 s, 1 attempt)",
        ),
        (
            EndpointResult(
                "lb:443",
                ServingState.CHAIN_INVALID,
                1.0,
                1,
                "1a",
                NOT_AFTER,
                reason="unable to get local issuer certificate",
                chain="invalid",
            ),
            "serving the new certificate after 1.0 s, but its chain does not validate: "
            "unable to get local issuer certificate",
        ),
        (
            EndpointResult("lb:443", ServingState.NOT_VERIFIED, 0, 0, reason="no SNI to send"),
            "not verified: no SNI to send",
        ),
    ],
)
def test_each_outcome_is_said_in_the_documented_words(result: EndpointResult, line: str) -> None:
    assert result.line() == line
    stored = result.to_dict()
    assert stored["line"] == line
    assert EndpointResult.from_dict(stored) == result
    assert serving_lines([result]) == [f"serving lb:443: {line}"]


def test_a_target_is_verified_only_when_every_endpoint_is() -> None:
    ok = EndpointResult("a:1", ServingState.VERIFIED, 1, 1)
    stale = EndpointResult("b:1", ServingState.STALE, 1, 1, "aa", NOT_AFTER)
    down = EndpointResult("c:1", ServingState.UNREACHABLE, 1, 1, reason="refused")
    assert summarise([ok, ok]) is ServingState.VERIFIED
    assert summarise([ok, down]) is ServingState.UNREACHABLE
    assert summarise([down, stale, ok]) is ServingState.STALE
    with pytest.raises(ValueError):
        summarise([])


@given(st.lists(st.sampled_from(list(ServingState)), min_size=1, max_size=8))
def test_the_summary_is_one_of_the_endpoints_states(states: list[ServingState]) -> None:
    results = [EndpointResult(f"h{i}:1", state, 1, 1) for i, state in enumerate(states)]
    verdict = summarise(results)
    assert verdict in states
    assert (verdict is ServingState.VERIFIED) == all(s is ServingState.VERIFIED for s in states)


def test_the_not_serving_message_says_the_write_happened_and_why_it_failed() -> None:
    stale = EndpointResult("b:1", ServingState.STALE, 5, 4, "aa", NOT_AFTER)
    message = not_serving_message("updated", [stale])
    assert message.startswith("the Secret was updated, but the new certificate is not served")
    assert "serving b:1: still serving serial aa" in message
