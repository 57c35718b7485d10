"""The sans-I/O JSON-RPC peer, without sockets."""

import json

import pytest

from lmgw.codes import RpcCode
from lmgw.jsonrpc import Busy, Ignored, Notification, Peer, Reply, Request, Response, RpcError


def error_of(event):
    assert isinstance(event, Reply)
    return json.loads(event.text)["error"]


def test_call_and_result_round_trip():
    caller, callee = Peer(), Peer()
    request_id, frame = caller.call("gw.ping", {"payload": 1})
    request = callee.receive(frame)
    assert request == Request(request_id, "gw.ping", {"payload": 1})
    response = caller.receive(callee.result(request.id, {"pong": True}))
    assert response == Response(request_id, "gw.ping", result={"pong": True})
    assert caller.in_flight == 0


def test_several_calls_in_flight_answered_out_of_order():
    caller, callee = Peer(), Peer()
    calls = [caller.call("m", {"n": n}) for n in range(3)]
    requests = [callee.receive(frame) for _, frame in calls]
    answers = [caller.receive(callee.result(r.id, r.params["n"])) for r in reversed(requests)]
    assert [a.result for a in answers] == [2, 1, 0]
    assert [a.id for a in answers] == [calls[2][0], calls[1][0], calls[0][0]]


def test_error_response_becomes_rpc_error():
    caller, callee = Peer(), Peer()
    request_id, frame = caller.call("lm.read", {})
    callee.receive(frame)
    response = caller.receive(callee.error(request_id, RpcError(RpcCode.INVALID_PARAMS, "bad", {"param": "lm"})))
    assert response.error.code == RpcCode.INVALID_PARAMS and response.error.data == {"param": "lm"}


def test_late_answer_after_cancel_is_ignored():
    caller, callee = Peer(), Peer()
    request_id, frame = caller.call("slow", {})
    caller.cancel(request_id)
    assert isinstance(caller.receive(callee.result(request_id, 1)), Ignored)


def test_fail_all_on_disconnect():
    caller = Peer()
    caller.call("a", {})
    caller.call("b", {})
    failed = caller.fail_all(RpcError(RpcCode.NOT_CONNECTED, "gone"))
    assert [(f.method, f.error.code) for f in failed] == [("a", RpcCode.NOT_CONNECTED), ("b", RpcCode.NOT_CONNECTED)]
    assert caller.in_flight == 0


def test_too_many_calls_in_flight_refused():
    caller = Peer(max_pending=2)
    caller.call("a", {})
    caller.call("b", {})
    with pytest.raises(RpcError) as info:
        caller.call("c", {})
    assert info.value.code == RpcCode.INTERNAL_ERROR


def test_calls_past_the_serving_bound_are_refused_and_answers_still_pass():
    """Issue 9 A1: a peer calling without waiting costs at most ``max_serving`` calls being served."""
    caller, callee = Peer(), Peer(max_serving=2)
    served = [callee.receive(caller.call("m", {"n": n})[1]) for n in range(2)]
    assert all(isinstance(event, Request) for event in served) and callee.serving == 2
    refused = [callee.receive(caller.call("m", {"n": n})[1]) for n in (2, 3)]
    assert [event.refused for event in refused] == [1, 2]
    errors = [caller.receive(event.text).error for event in refused]
    assert {e.code for e in errors} == {RpcCode.TOO_MANY_CALLS} and errors[0].data == {"max_in_flight": 2}
    dropped = callee.receive(caller.notify("m", {}))
    assert isinstance(dropped, Busy) and dropped.text is None
    # the callee's own calls are answered whatever its serving count
    request_id, frame = callee.call("back", {})
    assert callee.receive(caller.result(caller.receive(frame).id, "ok")) == Response(request_id, "back", result="ok")
    assert callee.finished() == 3  # refusals of the episode, reported once
    assert callee.finished() == 0 and callee.serving == 0
    assert isinstance(callee.receive(caller.call("m", {})[1]), Request)


def test_notification_has_no_id():
    assert Peer().receive(Peer().notify("gw.event", {"k": 1})) == Notification("gw.event", {"k": 1})


@pytest.mark.parametrize("frame, code", [
    ("{not json", RpcCode.PARSE_ERROR),
    ('[{"jsonrpc":"2.0","id":1,"method":"x"}]', RpcCode.INVALID_REQUEST),
    ('"just a string"', RpcCode.INVALID_REQUEST),
    ('{"jsonrpc":"1.0","id":1,"method":"x"}', RpcCode.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1}', RpcCode.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":true,"method":"x"}', RpcCode.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1,"method":5}', RpcCode.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1,"method":"x","params":[1,2]}', RpcCode.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":"' + "x" * 65 + '","method":"x"}', RpcCode.INVALID_REQUEST),
])
def test_malformed_frames_get_documented_errors(frame, code):
    assert error_of(Peer().receive(frame))["code"] == code


def test_binary_frame_refused():
    assert error_of(Peer().receive(b"\x00\x01"))["code"] == RpcCode.INVALID_REQUEST


def test_error_keeps_request_id_when_usable():
    reply = Peer().receive('{"jsonrpc":"2.0","id":7,"method":"x","params":"bad"}')
    assert json.loads(reply.text)["id"] == 7


def test_stray_and_malformed_responses_ignored_or_reported():
    peer = Peer()
    assert isinstance(peer.receive('{"jsonrpc":"2.0","id":99,"result":1}'), Ignored)
    request_id, _ = peer.call("m", {})
    response = peer.receive(json.dumps({"jsonrpc": "2.0", "id": request_id, "error": "oops"}))
    assert response.error.code == RpcCode.INTERNAL_ERROR


def test_malformed_notification_is_ignored_not_answered():
    assert isinstance(Peer().receive('{"jsonrpc":"2.0","method":"x","params":3}'), Ignored)


def test_a_result_that_is_not_json_is_never_sent_but_an_internal_error():
    looped: dict[str, object] = {}
    looped["self"] = looped
    for result in (float("nan"), float("inf"), "\udcff", {1, 2}, object(), looped):  # "\udcff": a file name's byte
        with pytest.raises(RpcError) as error:
            Peer().result(1, result)
        assert error.value.code == RpcCode.INTERNAL_ERROR and "not JSON" in error.value.message


@pytest.mark.parametrize("value", ["NaN", "-Infinity", '"\\ud800"', '{"\\udc00": 1}', '"a\\ude00b"'])
def test_frames_that_are_not_i_json_get_a_parse_error_that_names_the_problem(value):
    """What json.loads takes but no UTF-8 JSON text can carry back (websockets failed to send the answer
    and dropped the connection): refused where the frame is parsed."""
    peer = Peer()
    reply = peer.receive('{"jsonrpc":"2.0","id":1,"method":"gw.ping","params":{"payload":' + value + "}}")
    error = error_of(reply)
    assert error["code"] == RpcCode.PARSE_ERROR
    assert "unpaired surrogate \\ud" in error["message"] or "is not a JSON value" in error["message"], error
    reply.text.encode("utf-8")  # the refusal itself can be sent
    assert peer.serving == 0


def test_escaped_pairs_and_deep_nesting():
    pair = Peer().receive('{"jsonrpc":"2.0","id":1,"method":"m","params":{"s":"\\ud83d\\ude00 \\u00e9"}}')
    assert isinstance(pair, Request) and pair.params == {"s": "\U0001f600 \u00e9"}
    assert error_of(Peer().receive("[" * 100_000))["code"] == RpcCode.PARSE_ERROR


def test_params_that_cannot_be_sent_are_refused_before_the_call_goes_out():
    peer = Peer()
    for params in ({"x": float("inf")}, {"x": "\ud800"}):
        with pytest.raises(RpcError) as error:
            peer.call("lm.write", params)
        assert error.value.code == RpcCode.INVALID_PARAMS and "lm.write" in error.value.message
    assert peer.in_flight == 0
