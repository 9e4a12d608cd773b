import json

import pytest

from meshrl.engine.tasks import CodeVerifier, SandboxLimits, extract_code, get_verifier, outputs_match, parse_tests

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5)
ADD_STDIN = {"question": "Add two numbers.",
             "input_output": {"inputs": ["1 2\n", "10 -3\n", "5 5"], "outputs": ["3\n", "7\n", "10"]}}
ADD_CALL = {"question": "Add.", "input_output": json.dumps(
    {"fn_name": "add", "inputs": [[1, 2], [10, -3], [[1], [2]]], "outputs": [[3], [7], [[1, 2]]]})}
ADD_SRC = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(limits=LIMITS)


def test_extract_code():
    assert extract_code("Here:\n```python\nprint(1)\n```\ndone") == "print(1)\n"
    assert extract_code("```py\nx=1\n```\n```python3\nprint(2)\n```") == "print(2)\n"
    assert extract_code("```python\nprint(1)\n```\n```\nsome output\n```") == "print(1)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"
    assert extract_code("```python\nprint(5)\nprint(6)") == "print(5)\nprint(6)"  # cut off at max length


def test_outputs_match_up_to_trailing_whitespace():
    assert outputs_match("1 2  \n3\t\n\n\n", "1 2\n3")
    assert outputs_match("a\r\nb\r\n", "a\nb\n")
    assert not outputs_match(" 1\n", "1\n")  # leading whitespace counts
    assert not outputs_match("1\n\n2", "1\n2")  # blank lines inside count
    assert not outputs_match("12", "1 2")


def test_parse_tests_accepts_dict_and_json_and_names_bad_fields():
    inputs, outputs, fn_name = parse_tests(ADD_CALL)
    assert fn_name == "add" and inputs[0] == [1, 2] and outputs[1] == [7]
    assert parse_tests(ADD_STDIN)[2] is None
    with pytest.raises(ValueError, match="no 'input_output'"):
        parse_tests({"question": "q"})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_tests({"input_output": "{inputs"})
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_tests({"input_output": {"inputs": ["a", "b"], "outputs": ["c"]}})
    with pytest.raises(ValueError, match="no tests"):
        parse_tests({"input_output": {"inputs": [], "outputs": []}})


def test_stdin_programs(verifier):
    completions = [
        f"```python\n{ADD_SRC}```",                                    # right
        "a, b = map(int, input().split())\nprint(a + b, ' ')\n\n\n",  # right up to trailing whitespace
        "a, b = map(int, input().split())\nprint(a - b)\n",           # wrong
        "print(3)",                                                    # right on the first test only
        "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)",  # right output, crashes
        "this is not python",
    ]
    assert verifier([ADD_STDIN] * len(completions), completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_fraction_reward_and_list_io():
    record = {"input_output": {"inputs": [["1 2", ""], "2 2\n", "3 3\n"], "outputs": [["3"], "4\n", "7\n"]}}
    scores = CodeVerifier(limits=LIMITS, reward="fraction")([record], [ADD_SRC])
    assert scores == [pytest.approx(2 / 3)]


def test_function_calls(verifier):
    completions = [
        "def add(a, b):\n    print('noise on stdout')\n    return a + b\n",  # prints do not spoil the result
        "class Solution:\n    def add(self, a, b):\n        return a + b\n",
        "def add(a, b):\n    return a - b\n",
        "def plus(a, b):\n    return a + b\n",
        "def add(a, b):\n    return {a, b}\n",  # not JSON-representable: cannot equal the expected value
    ]
    assert verifier([ADD_CALL] * len(completions), completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_tuple_return_equals_list_output(verifier):
    record = {"input_output": {"fn_name": "pair", "inputs": [[1]], "outputs": [[[1, 2]]]}}
    assert verifier([record], ["def pair(x):\n    return (x, x + 1)\n"]) == [1.0]


def test_registry_builds_a_configured_code_verifier():
    v = get_verifier("code", reward="fraction", limits=LIMITS, max_workers=1)
    assert isinstance(v, CodeVerifier) and v.reward == "fraction" and v.sandbox.limits == LIMITS
    with pytest.raises(ValueError, match="'all' or 'fraction'"):
        CodeVerifier(reward="mean")


def test_max_tests_caps_the_tests_run():
    v = CodeVerifier(limits=LIMITS, max_tests=1)
    assert v([ADD_STDIN], ["print(3)"]) == [1.0]
