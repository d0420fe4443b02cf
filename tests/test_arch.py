"""The --arch grammar, equation (1) and (2), and Table IV."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psa.core.arch import (
    ArchError,
    is_parameter_matched,
    matched_arch,
    param_count,
    parse_arch,
    solve_width,
    study_architectures,
)

# Table IV as printed in the paper: (architecture, parameters, parameter matching)
TABLE_IV = [
    ("1*2048", 1_628_170, "Matched"),
    ("1*1024", 814_090, "Matched"),
    ("1*512", 407_050, "Matched"),
    ("1*256", 203_530, "Matched"),
    ("1*128", 101_770, "Matched"),
    ("1*64", 50_890, "Matched"),
    ("1*32", 25_450, "Matched"),
    ("1*16", 12_730, "Matched"),
    ("1*8", 6_370, "Matched"),
    ("1*4", 3_190, "Matched"),
    ("1*2", 1_600, "Asymmetric"),
    ("2*939", 1_629_175, "Matched"),
    ("2*588", 813_802, "Matched"),
    ("2*354", 407_110, "Matched"),
    ("2*214", 216_150, "Matched"),
    ("2*115", 104_775, "Matched"),
    ("2*59", 50_455, "Matched"),
    ("2*30", 24_790, "Matched"),
    ("2*16", 13_002, "Matched"),
    ("2*8", 6_442, "Matched"),
    ("2*4", 3_210, "Matched"),
    ("115*115", 1_612_195, "Matched"),
    ("91*91", 825_835, "Matched"),
    ("71*71", 414_295, "Matched"),
    ("56*56", 220_090, "Matched"),
    ("44*44", 120_130, "Matched"),
    ("35*35", 70_675, "Matched"),
    ("26*26", 38_230, "Matched"),
    ("18*18", 20_134, "Matched"),
    ("12*12", 11_266, "Matched"),
    ("8*8", 6_874, "Matched"),
    ("7*7", 5_911, "Asymmetric"),
    ("6*6", 4_990, "Asymmetric"),
    ("5*5", 4_105, "Asymmetric"),
    ("4*4", 3_250, "Matched"),
    ("3*3", 2_419, "Asymmetric"),
    ("2*2", 1_606, "Asymmetric"),
    ("1*1", 805, "Asymmetric"),
    ("939*2", 7_228, "Asymmetric"),
    ("588*2", 5_122, "Asymmetric"),
    ("354*2", 3_718, "Asymmetric"),
    ("214*2", 2_878, "Asymmetric"),
    ("115*2", 2_284, "Asymmetric"),
    ("59*2", 1_948, "Asymmetric"),
    ("30*2", 1_774, "Asymmetric"),
    ("16*2", 1_690, "Asymmetric"),
    ("8*2", 1_642, "Asymmetric"),
    ("4*2", 1_618, "Asymmetric"),
    ("2048*1", 4_899, "Asymmetric"),
    ("1024*1", 2_851, "Asymmetric"),
    ("512*1", 1_827, "Asymmetric"),
    ("256*1", 1_315, "Asymmetric"),
    ("128*1", 1_059, "Asymmetric"),
    ("64*1", 931, "Asymmetric"),
    ("32*1", 867, "Asymmetric"),
    ("16*1", 835, "Asymmetric"),
    ("8*1", 819, "Asymmetric"),
    ("4*1", 811, "Asymmetric"),
    ("2*1", 807, "Asymmetric"),
]


def test_basic_grammar():
    a = parse_arch("[2*128, 4*64]")
    assert a.hidden == (128, 128, 64, 64, 64, 64)
    assert a.blocks == ((2, 128), (4, 64))
    assert parse_arch("  [ 2 x 128 ,4X64 ] ") == a
    assert parse_arch("2*128, 4*64") == a
    assert parse_arch("[]").hidden == ()
    assert parse_arch("[]").params == 784 * 10 + 10
    assert str(a) == "[2*128, 4*64]"
    assert parse_arch("18*18").short == "18*18"


@pytest.mark.parametrize(
    "bad",
    ["[0*5]", "[2*]", "[-1*3]", "[1*10**9]", "[1*1000000000]", "[1*128", "1*128]", "[[1*2]]", "[a*b]",
     "[1*2,]", "[,]", "abc", "[1*2; 3*4]", "[1.5*2]", "[1*0]", "[100001*1]", "[2*100000, 2*100000]", "", "  "],
)
def test_bad_arch_strings(bad):
    with pytest.raises(ArchError):
        parse_arch(bad)


@pytest.mark.parametrize("bad, message", [
    ("[1*128] [2*64]", "one pair of brackets per architecture: '[1*128] [2*64]' has 2"),  # it said "unbalanced"
    ("[[1*2]]", "one pair of brackets per architecture"),
    ("[1*128]]", "unbalanced brackets"),
    ("[1*128", "unbalanced brackets"),
])
def test_bracket_errors_say_what_is_wrong(bad, message):
    with pytest.raises(ArchError, match=re.escape(message)):
        parse_arch(bad)


@given(st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_any_string_parses_or_raises_arch_error(text):
    try:
        arch = parse_arch(text)
    except ArchError:
        return
    # whatever parses is a real net: positive widths, equation (1), and it prints back to itself
    # (not "at least logistic regression's 7,850 parameters": 1*1 has 805)
    assert all(w >= 1 for w in arch.hidden)
    w = arch.widths
    assert arch.params == sum((a + 1) * b for a, b in zip(w[:-1], w[1:])) >= 805
    assert parse_arch(str(arch)) == arch


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 300)), max_size=4))
@settings(max_examples=200, deadline=None)
def test_round_trip_and_param_count(blocks):
    text = "[" + ", ".join(f"{d}*{w}" for d, w in blocks) + "]"
    arch = parse_arch(text)
    assert parse_arch(str(arch)) == arch
    sizes = [784, *arch.hidden, 10]
    assert arch.params == sum(b * a + b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("name,params,matching", TABLE_IV)
def test_table_iv(name, params, matching):
    arch = parse_arch(name)
    assert arch.params == params
    assert is_parameter_matched(arch) == (matching == "Matched")


def test_equation_2_width_solver():
    one = parse_arch("1*2048")
    assert round(solve_width(one.params, 2)) == 939
    assert matched_arch(one, 2).short == "2*939"
    assert solve_width(param_count([64]), 1) == pytest.approx(64)
    for depth, width in [(3, 17), (5, 200), (12, 12)]:
        assert solve_width(param_count([width] * depth), depth) == pytest.approx(width)


def test_study_architectures():
    archs = study_architectures()
    assert len(archs) == 98
    assert len({a.short for a in archs}) == 98
    assert archs[0].short == "1*2048" and archs[-1].short == "2*1"
    assert sum(is_parameter_matched(a) for a in archs) == 40
