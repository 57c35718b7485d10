"""Device profiles and the gateway's [[bus]]/[[lm]]/[shed]/[bridge] sections: good and bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from lmgw.config import ConfigError
from lmgw.modbus.config import LmConfig, frame_gap, parse_lm_sections
from lmgw.modbus.errors import OutOfRange
from lmgw.modbus.lm import LoadManager
from lmgw.modbus.codec import EncodeError
from lmgw.modbus.profile import ProfileError, load_profile, parse_profile, plan_reads, shipped_profiles
from lmgw.modbus.transport import Link

GOOD = {
    "device": {"model": "m1", "word_order": "little"},
    "point": [
        {"name": "relay", "register": "coil", "address": 0, "type": "bool", "access": "rw", "shed_value": False},
        {"name": "power", "register": "input", "address": 0, "type": "s32", "scale": 0.1, "unit": "W"},
        {"name": "limit", "register": "holding", "address": 5, "type": "u16", "access": "rw", "min": 0, "max": 100},
    ],
}


def with_point(**changes):
    data = copy.deepcopy(GOOD)
    data["point"][2].update(changes)
    data["point"][2] = {k: v for k, v in data["point"][2].items() if v is not None}
    return data


def test_shipped_simulated_profile():
    assert "simulated-lm" in shipped_profiles()
    profile = load_profile("simulated-lm")
    assert profile.model == "simulated-lm"
    relays = [p for p in profile.points.values() if p.shed_value is not None]
    assert [p.name for p in relays] == ["relay_1", "relay_2", "relay_3", "relay_4"]
    assert profile.points["total_power"].encoding.word_order == "little"
    assert {p.encoding.type for p in profile.points.values()} == {"bool", "u16", "s16", "u32", "s32", "f32"}


def test_defaults_from_device_and_point_overrides():
    profile = parse_profile(GOOD, "test")
    assert profile.points["power"].encoding.word_order == "little"
    assert profile.points["limit"].writable and not profile.points["power"].writable
    assert profile.points["limit"].check_value(100) == [100]


def test_profile_file_by_path(tmp_path: Path):
    path = tmp_path / "dev.toml"
    path.write_text('[device]\nmodel = "x"\n[[point]]\nname = "a"\nregister = "input"\naddress = 1\ntype = "u16"\n')
    assert load_profile(str(path)).points["a"].address == 1
    with pytest.raises(ProfileError, match="must be absolute"):
        load_profile("dev.toml")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(str(tmp_path / "missing.toml"))
    path.write_text("[device\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="no shipped profile 'nope'; shipped: simulated-lm"):
        load_profile("nope")


@pytest.mark.parametrize("data,message", [
    ({"point": GOOD["point"]}, "missing key 'model'"),
    ({"device": {"model": "m"}}, "at least one"),
    ({**GOOD, "extra": 1}, "unknown key or section 'extra'"),
    (with_point(register="eeprom"), "register must be one of"),
    (with_point(type="u64"), "type must be one of"),
    (with_point(type="bool"), "bool goes with coil"),
    (with_point(address=-1), "address -1 out of"),
    (with_point(address=65535, type="u32"), "out of 0..65534"),
    (with_point(access="w"), "access must be"),
    (with_point(min=10, max=5), "greater than max"),
    (with_point(scale=0), "scale must be positive"),
    (with_point(word_order="middle"), "word_order must be"),
    (with_point(name="Bad Name"), "lower case letters"),
    (with_point(name="relay"), "defined twice"),
    (with_point(adress=3), "unknown key 'adress'"),
    (with_point(address=1, register="input", access="r", min=None, max=None), "overlap at input 1"),
    (with_point(shed_value=1000), "shed_value 1000 is outside the allowed range"),
    (with_point(address="5"), "'address' must be int"),
])
def test_bad_profiles_are_refused_with_the_point_named(data, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(data, "test")


def test_read_only_register_kinds_cannot_be_writable():
    data = copy.deepcopy(GOOD)
    data["point"][1]["access"] = "rw"
    with pytest.raises(ProfileError, match="input points are read-only by Modbus"):
        parse_profile(data, "test")
    data = copy.deepcopy(GOOD)
    data["point"][1]["shed_value"] = 0
    with pytest.raises(ProfileError, match="shed_value needs access"):
        parse_profile(data, "test")


def test_range_is_the_profile_bounds_within_the_type_limits():
    """A15: a point without min/max is still bounded by its type (and scale)."""
    data = copy.deepcopy(GOOD)
    data["point"] += [
        {"name": "tenths", "register": "holding", "address": 6, "type": "u16", "scale": 0.1, "access": "rw"},
        {"name": "signed", "register": "holding", "address": 7, "type": "s32", "access": "rw", "max": 5e9},
        {"name": "floor", "register": "holding", "address": 9, "type": "s16", "access": "rw", "min": 100},
    ]
    points = parse_profile(data, "test").points
    assert points["tenths"].range == (0, 6553.5)
    assert points["signed"].range == (-2147483648, 2147483647)  # max beyond the type: the type wins
    assert points["floor"].range == (100, 32767)
    assert points["limit"].range == (0, 100)
    assert points["relay"].range is None
    assert points["tenths"].describe()["range"] == [0, 6553.5] and "range" not in points["power"].describe()
    with pytest.raises(EncodeError, match=r"outside the allowed range \[0, 6553.5\]"):
        points["tenths"].check_value(6553.6)


def test_out_of_range_error_names_the_type_limits():
    """A15: -32013's data.range is never [null, null]."""
    data = copy.deepcopy(GOOD)
    data["point"].append({"name": "energy", "register": "holding", "address": 6, "type": "u32", "access": "rw"})
    config = LmConfig("lm1", "/m1.toml", "tcp", 1, 1.0, 0, host="127.0.0.1")
    lm = LoadManager(config, parse_profile(data, "test"), Link.tcp(config))  # prepare_write never touches the link
    with pytest.raises(OutOfRange) as info:
        lm.prepare_write({"energy": -1})
    assert info.value.data["range"] == [0, 4294967295] and "[0, 4294967295]" in info.value.message
    with pytest.raises(OutOfRange) as info:
        lm.prepare_write({"limit": 101})
    assert info.value.data["range"] == [0, 100]
    with pytest.raises(OutOfRange) as info:
        lm.prepare_write({"relay": 1})
    assert "range" not in info.value.data


def test_plan_reads_merges_adjacent_points_only():
    profile = load_profile("simulated-lm")
    blocks = plan_reads(profile.points.values(), profile)
    by_start = {(b.register, b.address): (b.count, [p.name for p in b.points]) for b in blocks}
    assert by_start[("coil", 0)] == (4, ["relay_1", "relay_2", "relay_3", "relay_4"])
    assert by_start[("input", 10)] == (8, ["power_1", "power_2", "power_3", "power_4"])
    assert by_start[("input", 20)] == (2, ["total_power"])  # not merged across the gap 18..19
    assert len(blocks) == 8
    small = parse_profile({**load_profile_dict(), "device": {"model": "s", "max_read_registers": 4}}, "s")
    sizes = [b.count for b in plan_reads(small.points.values(), small) if b.register == "input"]
    assert max(sizes) <= 4


def load_profile_dict():
    import tomllib
    from importlib import resources
    return tomllib.loads((resources.files("lmgw.profiles") / "simulated-lm.toml").read_text())


# -- gateway configuration sections -----------------------------------------------------------

BUS = {"name": "rs485", "device": "/dev/ttyS1", "baudrate": 9600, "parity": "E"}
TCP_LM = {"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "10.0.0.5"}
RTU_LM = {"name": "lm2", "profile": "simulated-lm", "transport": "rtu", "bus": "rs485", "unit": 3}


def test_config_sections_parse_with_defaults():
    sections = parse_lm_sections({"bus": [BUS], "lm": [TCP_LM, RTU_LM], "dso": {"url": "ignored"}})
    bus = sections.buses["rs485"]
    assert bus.parity == "E" and bus.inter_frame == pytest.approx(3.5 * 11 / 9600)
    assert sections.lms["lm1"].port == 502 and sections.lms["lm1"].unit == 1
    assert sections.lms["lm2"].timeout == bus.timeout and sections.lms["lm2"].retries == bus.retries
    assert not sections.bridge.enabled and sections.shed.max_duration == 4 * 3600
    assert parse_lm_sections({}).lms == {}
    assert frame_gap(115200) == 0.00175
    assert bus.recovery is None  # the failed request's timeout
    assert parse_lm_sections({"bus": [{**BUS, "recovery_ms": 150}]}).buses["rs485"].recovery == 0.15


@pytest.mark.parametrize("config,message", [
    ({"lm": [{**RTU_LM, "bus": "nope"}], "bus": [BUS]}, "names bus 'nope'"),
    ({"lm": [{**TCP_LM, "transport": "udp"}]}, "must be \"tcp\" or \"rtu\""),
    ({"lm": [{**TCP_LM, "unit": 0}]}, "must be 1..247"),
    ({"lm": [TCP_LM, TCP_LM]}, "two \\[\\[lm\\]\\] sections are named 'lm1'"),
    ({"lm": [RTU_LM, {**RTU_LM, "name": "lm3"}], "bus": [BUS]}, "unit 3 on bus 'rs485' is already LM 'lm2'"),
    ({"bus": [{**BUS, "baudrate": 12345}]}, "standard rate"),
    ({"bus": [{**BUS, "parity": "X"}]}, "parity"),
    ({"bus": [{**BUS, "recovery_ms": -1}]}, "'recovery_ms' in \\[bus 'rs485'\\] must be >= 0"),
    ({"bus": [BUS, {**BUS, "name": "b2"}]}, "already used by another bus"),
    ({"lm": [{**TCP_LM, "timeout": 0}]}, "positive"),
    ({"lm": [{**TCP_LM, "hots": "x"}]}, "unknown key 'hots'"),
    ({"lm": {"name": "x"}}, "array of tables"),
    ({"bridge": {"enabled": True, "listen": "0.0.0.0", "bus": "rs485"}, "bus": [BUS]}, "one LAN address"),
    ({"bridge": {"enabled": True, "listen": "192.168.1.2", "bus": "x"}, "bus": [BUS]}, "not a configured"),
    ({"shed": {"default_randomize": 10, "max_duration": 5}}, "between 0 and max_duration"),
])
def test_bad_config_sections_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_lm_sections(config)
