"""A1111 prompt syntax: attention lists, schedules, AND, extra networks, the AST, errors, fuzzing.

Expected values are A1111's (modules/prompt_parser.py doctests, and its functions run under lark 1.1.2).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstudio.errors import RequestError
from sdstudio.prompts.grammar import (
    BREAK_MARK,
    Alternate,
    Break,
    Edit,
    PromptSyntaxError,
    Text,
    Weighted,
    attention,
    edit_end_step,
    explain,
    parse,
    render,
    schedule,
)
from sdstudio.prompts.grammar_nodes import ROUND, SQUARE

# ---- attention: A1111's parse_prompt_attention ------------------------------------------------------

ATTENTION = [
    # the docstring of parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # more, checked against A1111
    ("", [("", 1.0)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("[x]", [("x", 0.9090909090909091)]),
    ("[[x]]", [("x", 0.8264462809917354)]),
    ("a [b] ((c)) [[d]]", [("a ", 1.0), ("b", 0.9090909090909091), (" ", 1.0), ("c", 1.2100000000000002),
                           (" ", 1.0), ("d", 0.8264462809917354)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:+2)", [("x", 2.0)]),
    ("(x:0)", [("x", 0.0)]),
    ("(x:cat)", [("x:cat", 1.1)]),
    ("x:1.2)", [("x:1.2)", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("(a]", [("a]", 1.1)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),
    ("(a\\:1.5)", [("a", 1.5)]),
    ("\\\\", [("\\", 1.0)]),
    ("\\a", [("a", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK_MARK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK_MARK, ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("a\\BREAK b", [("a", 1.0), BREAK_MARK, ("b", 1.0)]),
    ("xBREAK y", [("xBREAK y", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_attention_matches_a1111(text, expected):
    assert attention(text) == expected


# ---- schedules: A1111's get_learned_conditioning_prompt_schedules -----------------------------------

def steps_of(prompt: str, steps: int = 10, **kw) -> list[tuple[int, str]]:
    (sub,) = schedule(parse(prompt), steps, **kw).subprompts
    return [(s.end_step, s.text) for s in sub.steps]


def alternating(a: str, b: str, n: int = 10) -> list[tuple[int, str]]:
    return [(i, a if i % 2 else b) for i in range(1, n + 1)]


SCHEDULES = [
    # the doctests of get_learned_conditioning_prompt_schedules (10 steps)
    ("test", {}, [(10, "test")]),
    ("a [b:3]", {}, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", {}, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", {}, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", {}, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", {}, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", {}, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", {}, [(10, "a [unbalanced")]),
    ("a [b:.5] c", {}, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", {}, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", {}, alternating("a", "(b:1.1)")),
    ("[fe|]male", {}, alternating("female", "male")),
    ("[fe|||]male", {}, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("a [b:.5] c", {"hires_steps": 10}, [(10, "a b c")]),
    ("a [b:1.5] c", {"hires_steps": 10}, [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest expects an edit here, but its grammar rejects the `|` (lark 1.1.2): literal
    ("a [{b|d{:.5] c", {}, [(10, "a [{b|d{:.5] c")]),
    # more, checked against A1111
    ("a [b:c:0.5] d", {}, [(5, "a b d"), (10, "a c d")]),
    ("[a:b:0.99]", {}, [(9, "a"), (10, "b")]),          # int(9.9)
    ("[a:b:1.0]", {}, [(10, "a")]),                     # a fraction: all 10 steps
    ("[a:b:5.0]", {}, [(10, "a")]),                     # 50 steps, capped
    ("[a:b:1e1]", {}, [(10, "a")]),                     # no '.': step 10
    ("[x:-1]", {}, [(10, "x")]),
    ("[a:b:0]", {}, [(10, "b")]),
    ("[a|b|c]", {}, [(i, "abc"[(i - 1) % 3]) for i in range(1, 11)]),
    ("[[a|b]:c:3]", {}, [(1, "a"), (2, "b"), (3, "a"), *((i, "c") for i in range(4, 11))]),
    ("a | [b:c:2]", {}, [(10, "a | [b:c:2]")]),        # stray `|`: no scheduling at all
    ("[a:b:0.5]", {"old_scheduling": True}, [(5, "a"), (10, "b")]),
    ("[a:b:2]", {"hires_steps": 20}, [(20, "b")]),
    ("[a:b:12]", {"hires_steps": 20}, [(2, "a"), (20, "b")]),
    ("[a:b:1.25]", {"hires_steps": 20}, [(5, "a"), (20, "b")]),
    ("[a:b:0.5]", {"hires_steps": 20, "old_scheduling": True}, [(5, "a"), (10, "b")]),
]


@pytest.mark.parametrize(("prompt", "kw", "expected"), SCHEDULES)
def test_schedule_matches_a1111(prompt, kw, expected):
    assert steps_of(prompt, **kw) == expected


def test_schedule_at_other_step_counts():
    assert steps_of("a [b:c:0.5] d", 7) == [(3, "a b d"), (7, "a c d")]  # int(3.5)
    landscape = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
                 "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert steps_of(landscape, 100) == [  # the example at the top of A1111's prompt_parser.py
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_step_lookup_follows_a1111():
    plan = schedule(parse("a [b:3]"), 10)
    # sampler step index 0..3 -> "a " (end_step 3 is inclusive), 4..10 -> "a b"; past the end: the first
    assert [plan.at(i)[0][0] for i in range(12)] == ["a "] * 4 + ["a b"] * 7 + ["a "]
    alt = schedule(parse("[x|y]"), 4)
    assert [alt.at(i)[0][0] for i in range(4)] == ["x", "x", "y", "x"]
    assert alt.texts == ("x", "y")


def test_edit_end_step():
    edit = parse("[a:b:0.5]").subprompts[0].nodes[0]
    assert isinstance(edit, Edit)
    assert edit_end_step(edit, 10) == 5
    assert edit_end_step(edit, 10, hires_steps=20) == -10
    with pytest.raises(RequestError):
        edit_end_step(edit, 0)


def test_scheduled_weight_and_render():
    sub = parse("(x:[1.5|0.5])").subprompts[0]
    assert sub.nodes[0].weight is None
    assert render(sub.nodes, 1, 10) == "(x:1.5)" and render(sub.nodes, 2, 10) == "(x:0.5)"
    assert [attention(s.text) for s in schedule(parse("(x:[1.5|0.5])"), 2).subprompts[0].steps] == [
        [("x", 1.5)], [("x", 0.5)]]


# ---- AND, extra networks, escapes, negative prompts -------------------------------------------------

@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a cat:2", [("a cat", 2.0)]),
    ("a AND b: 1. AND c :-.5 ", [("a", 1.0), (" b", 1.0), (" c", -0.5)]),
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("[a:b:0.5]", [("[a:b:0.5]", 1.0)]),
])
def test_and_splits_with_weights(prompt, expected):
    assert [(s.text, s.weight) for s in parse(prompt).subprompts] == expected


def test_and_subprompts_are_scheduled_separately():
    plan = schedule(parse("a [b:c:0.5] AND [x|y] :0.3"), 4)
    assert [(s.weight, [(e.end_step, e.text) for e in s.steps]) for s in plan.subprompts] == [
        (1.0, [(2, "a b"), (4, "a c")]), (0.3, [(1, " x"), (2, " y"), (3, " x"), (4, " y")])]
    assert plan.at(2) == (("a b", 1.0), (" y", 0.3))


def test_extra_networks_are_extracted_and_removed():
    p = parse("a <lora:name:0.7> b <lyco:c:1:0.5> [d|<hypernet:h>]")
    assert p.text_without_networks == "a  b  [d|]"
    assert [(n.kind, n.name, n.args) for n in p.extra_networks] == [
        ("lora", "name", ("0.7",)), ("lyco", "c", ("1", "0.5")), ("hypernet", "h", ())]
    assert [n.column for n in p.extra_networks] == [2, 20, 38]
    assert [n.multipliers() for n in p.extra_networks[:2]] == [(0.7, 0.7), (1.0, 0.5)]
    assert parse("<lora:x:te=0.3:unet=0.6>").extra_networks[0].multipliers() == (0.3, 0.6)
    assert steps_of("a <lora:name:0.7> b", 5) == [(5, "a  b")]
    with pytest.raises(PromptSyntaxError) as err:
        parse("a <lora:x:abc>").extra_networks[0].multipliers("a <lora:x:abc>")
    assert err.value.column == 2


def test_spans_point_into_the_original_prompt():
    p = parse("ab<lora:x:1>cd [e:f:2]")
    texts = p.subprompts[0].nodes
    assert texts[:2] == (Text("ab"), Text("cd "))  # split where the tag was
    assert texts[0].span == (0, 2) and texts[1].span == (12, 15) and texts[2].span == (15, 22)
    with pytest.raises(PromptSyntaxError) as err:
        parse("x<lora:a:1> (y:1..2)")
    assert err.value.column == 15  # the weight, in the prompt as written


def test_escapes_are_literal():
    (sub,) = parse("\\(a\\) \\[b\\] \\\\ [c\\:d]").subprompts
    assert sub.nodes == (Text("\\(a\\) \\[b\\] \\\\ "), Weighted((Text("c\\:d"),), SQUARE, "["))
    assert sub.nodes[0].text == "(a) [b] \\ "
    assert attention(sub.text) == [("(a) [b] \\ ", 1.0), ("c:d", SQUARE)]
    assert parse("[c\\:d:2]").subprompts[0].nodes == (Edit((), (Text("c\\:d"),), 2.0, False, has_before=False),)
    assert steps_of("a\\|b [c:2]", 4) == [(2, "a\\|b "), (4, "a\\|b c")]  # an escaped | is not syntax


def test_negative_prompts_are_not_split_nor_stripped():
    p = parse("ugly <lora:x:1> AND blurry:0.5", negative=True)
    assert [(s.text, s.weight) for s in p.subprompts] == [("ugly <lora:x:1> AND blurry:0.5", 1.0)]
    assert p.extra_networks == () and any("negative" in n.message for n in p.notes)


# ---- the AST ----------------------------------------------------------------------------------------

def test_ast_of_every_construct():
    nodes = parse("a (b:1.3) [c] ((d)) [e:f:0.5] [g::3] [h:4] [i|j] BREAK k").subprompts[0].nodes
    assert nodes == (
        Text("a "), Weighted((Text("b"),), 1.3, "(", (Text("1.3"),)), Text(" "),
        Weighted((Text("c"),), SQUARE, "["), Text(" "),
        Weighted((Weighted((Text("d"),), ROUND),), ROUND), Text(" "),
        Edit((Text("e"),), (Text("f"),), 0.5, True), Text(" "),
        Edit((Text("g"),), (), 3.0, False), Text(" "),
        Edit((), (Text("h"),), 4.0, False, has_before=False), Text(" "),
        Alternate(((Text("i"),), (Text("j"),))), Text(" "), Break(), Text(" k"),
    )


def test_unbalanced_brackets_are_stray_text():
    p = parse("(a [b:c:2] d")
    assert p.subprompts[0].nodes[0] == Text("(", stray=True)
    assert isinstance(p.subprompts[0].nodes[2], Edit)
    assert steps_of("(a [b:c:2] d") == [(2, "(a b d"), (10, "(a c d")]
    assert attention("(a b d") == [("a b d", 1.1)]  # the unclosed ( weights to the end
    assert [n.column for n in p.notes] == [0]


def test_grammar_rejection_is_literal_with_a_note():
    p = parse("a | [b:c:2]")
    assert p.subprompts[0].literal and not p.is_scheduled
    assert p.notes[0].column == 2 and "as written" in p.notes[0].message


def test_a1111_hash_dependent_case_is_noted():
    # lark resolves this tie by set order: A1111's result depends on PYTHONHASHSEED
    p = parse("[a:b:3]:")
    assert any("hash seed" in n.message for n in p.notes)
    assert steps_of("[a:b:3]:") == [(3, "a:"), (10, "b:")]
    assert not any("hash seed" in n.message for n in parse("[a:b:3] :").notes)


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "column"), [
    ("a (x:1.2.3) cat", 5),
    ("(x:.)", 3),
    ("[a:b:1e999]", 5),
    ("x AND y :" + "9" * 400, 9),
    ("(" * 101 + "a" + ")" * 101, 0),
])
def test_parse_errors_point_at_the_culprit(prompt, column):
    with pytest.raises(PromptSyntaxError) as err:
        parse(prompt)
    assert err.value.column == column
    assert isinstance(err.value, RequestError) and err.value.field == "prompt"
    caret_line = str(err.value).splitlines()[-1]
    assert caret_line.index("^") - 2 == min(column, 40) + (3 if column > 40 else 0)


def test_step_dependent_errors_come_from_schedule():
    p = parse("a (x:[1.2|1..2]) b")
    with pytest.raises(PromptSyntaxError) as err:
        schedule(p, 10)
    assert err.value.column == 10 and "1..2" in str(err.value)
    with pytest.raises(RequestError):
        schedule(p, 0)


def test_explain_gives_schedule_and_attention():
    e = explain(parse("a [(b):c:0.5] <lora:z:0.5> AND d:0.3"), 4)
    assert [(s.end_step, s.attention) for s in e.subprompts[0].steps] == [
        (2, (("a ", 1.0), ("b", 1.1))), (4, (("a c", 1.0),))]
    assert e.subprompts[1].weight == 0.3
    text = e.to_text()
    assert "<lora:z:0.5>" in text and "'b'x1.1" in text and "weight 0.3" in text


# ---- fuzzing ----------------------------------------------------------------------------------------

SYNTAX = st.lists(st.sampled_from(["(", ")", "[", "]", ":", "|", "\\", " ", "AND", " AND ", "BREAK", "0.5", "a",
                                   "1", ".", "\n", "<lora:x:0.5>", "[a:b:2]", "[a|b]", "(x:1.5)", "-", "e"]),
                  max_size=30).map("".join)


def _exercise(prompt: str) -> None:
    try:
        p = parse(prompt)
        for sub in p.subprompts:
            if not sub.literal and not p.is_scheduled:
                assert render(sub.nodes, 1, 10) == sub.text  # the AST renders back to the source
        explain(p, 3)
        explain(parse(prompt, negative=True), 5)
    except PromptSyntaxError as e:
        assert 0 <= e.column < len(prompt)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_any_text(prompt):
    _exercise(prompt)


@settings(max_examples=500, deadline=None)
@given(SYNTAX)
def test_fuzz_syntax_alphabet(prompt):
    _exercise(prompt)


@settings(max_examples=200, deadline=None)
@given(SYNTAX)
def test_fuzz_attention_only_raises_syntax_errors(text):
    try:
        pieces = attention(text)
    except PromptSyntaxError as e:
        assert 0 <= e.column < len(text)
    else:
        assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)


def _group(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(inner.map(lambda s: f"({s})"), inner.map(lambda s: f"[{s}]"),
                     st.tuples(inner, st.sampled_from(["1.5", "0.5", " 2 "])).map(lambda t: f"({t[0]}:{t[1]})"))


BALANCED = st.recursive(st.sampled_from(["a", "b c", " ", "d,"]),
                        lambda inner: st.one_of(_group(inner), st.lists(inner, min_size=2, max_size=3).map("".join)),
                        max_leaves=12)


def _tree_weights(nodes, scale=()) -> list[tuple[str, float]]:
    """(text, product of the enclosing Weighted weights, innermost first as A1111 multiplies)."""
    out = []
    for n in nodes:
        if isinstance(n, Weighted):
            out += _tree_weights(n.children, (n.weight, *scale))
        else:
            w = 1.0
            for m in scale:
                w *= m
            out.append((n.text, w))
    merged: list[tuple[str, float]] = []
    for text, w in out:
        merged[-1:] = [(merged[-1][0] + text, w)] if merged and merged[-1][1] == w else [*merged[-1:], (text, w)]
    return merged


@settings(max_examples=300, deadline=None)
@given(BALANCED)
def test_balanced_tree_weights_equal_attention(prompt):
    """Without stray brackets, the AST's Weighted nodes say exactly what the attention pass computes."""
    (sub,) = parse(prompt).subprompts
    assert (_tree_weights(sub.nodes) or [("", 1.0)]) == attention(sub.text)
