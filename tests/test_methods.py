"""Method tables: parameter validation happens before handlers run."""

import asyncio

import pytest

from lmgw.codes import RpcCode
from lmgw.jsonrpc import RpcError
from lmgw.methods import MethodTable, Param


def positive(value):
    if value <= 0:
        raise ValueError("must be positive")


async def echo(name, count, ratio):
    return {"name": name, "count": count, "ratio": ratio}


async def broken():
    raise KeyError("boom")


@pytest.fixture
def table():
    t = MethodTable()
    t.add("echo", echo, [Param("name", str), Param("count", int, check=positive), Param("ratio", float, required=False, default=0.5)])
    t.add("broken", broken)
    return t


def dispatch(table, method, params):
    return asyncio.run(table.dispatch(method, params))


def test_valid_call_gets_defaults(table):
    assert dispatch(table, "echo", {"name": "a", "count": 2}) == {"name": "a", "count": 2, "ratio": 0.5}


def test_integer_accepted_as_number(table):
    assert dispatch(table, "echo", {"name": "a", "count": 2, "ratio": 1})["ratio"] == 1


@pytest.mark.parametrize("params, param", [
    ({"count": 1}, "name"),
    ({"name": 1, "count": 1}, "name"),
    ({"name": "a", "count": True}, "count"),
    ({"name": "a", "count": 0}, "count"),
    ({"name": "a", "count": 1, "extra": 1}, "extra"),
])
def test_bad_params_name_the_parameter(table, params, param):
    with pytest.raises(RpcError) as info:
        dispatch(table, "echo", params)
    assert info.value.code == RpcCode.INVALID_PARAMS
    assert info.value.data == {"param": param}


def test_unknown_method_lists_known_ones(table):
    with pytest.raises(RpcError) as info:
        dispatch(table, "nope", {})
    assert info.value.code == RpcCode.METHOD_NOT_FOUND and info.value.data == {"methods": ["broken", "echo"]}


def test_handler_crash_becomes_internal_error(table):
    with pytest.raises(RpcError) as info:
        dispatch(table, "broken", {})
    assert info.value.code == RpcCode.INTERNAL_ERROR and "KeyError" in info.value.message


def test_duplicate_registration_refused(table):
    with pytest.raises(ValueError):
        table.add("echo", echo)
