"""The model files of test_hostile_files: for each case, how to write the file, what the isolated harness does with
it (isolated_harness.ACTIONS) and what must come of it. A case with `check` must be accepted (check(value,
expected) asserts on what the action returned); every other case must be rejected with a ModelFileError naming
the file and holding each string of `expect`."""
import json
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from gguf_bytes import (ARRAY, F32, F32_TYPE, I32, Q8_0_TYPE, STRING, U8, U32, U64, array, f32_tensor_file, gguf_file,
                        gstr, kv, kv_array, kv_scalar, kv_str, string_array_body, tensor_info)

from fixtures.flux import random_flux_state_dict
from kontext_lowvram.loaders import convert_state_dict
from kontext_lowvram.loaders.flux_layout import FluxConfig
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor

# A tiny but real FLUX layout (the loaders detect its config from the key shapes); 64 wide fits Q8_0 blocks.
TINY_FLUX = FluxConfig(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=32, vec_in_dim=16)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable  # build(path) writes the file; returns what `check` compares against (or None)
    action: str = "load"
    expect: tuple = ()
    check: Optional[Callable] = None
    suffix: str = ".gguf"
    time_cap: int = 10  # seconds; a reader hanging on a hostile count is stopped here


def data(content):
    def build(path):
        path.write_bytes(content)
    return build


def lazy(make):
    """Like data(), for big contents: made only when the file is written, not when the tests are collected."""
    def build(path):
        path.write_bytes(make())
    return build


def padded(content, size):
    """`content`, then zeros up to `size` bytes: a sparse file, so a big one costs no disk."""
    def build(path):
        with open(path, "wb") as f:
            f.write(content)
            f.truncate(size)
    return build


ARCH = kv_str("general.architecture", "flux")


def one_tensor(dims=(8, 2), ggml_type=F32_TYPE, offset=0, name="img_in.weight", data_bytes=64, kvs=(ARCH,),
               alignment=32):
    return gguf_file(kvs, [tensor_info(name, list(dims), ggml_type, offset)], data=b"\0" * data_bytes,
                     alignment=alignment)


def f32_tensors(*specs):
    """F32 tensors at the offsets given, [(name, dims, offset)], over enough zeroed data for all of them."""
    end = max(offset + 4 * numel(dims) for _, dims, offset in specs)
    return gguf_file([ARCH], [tensor_info(n, d, F32_TYPE, o) for n, d, o in specs], data=b"\0" * end)


def numel(dims):
    n = 1
    for d in dims:
        n *= d
    return n


# ---- balloons: files whose counts make gguf-py loop and grow without the validator ----

def Balloon(*args, **kw):  # noqa: N802 - a Case with room for the memory cap to stop gguf-py before the time cap
    return Case(*args, **{"time_cap": 30, **kw})


BALLOONS = [
    Balloon("array_2p60_elements_load", data(gguf_file([kv_array("tokenizer.ggml.tokens", U8, 2 ** 60)])),
         expect=("tokenizer.ggml.tokens", str(2 ** 60))),
    Balloon("array_2p60_elements_text_encoder", data(gguf_file([kv_array("tokenizer.ggml.tokens", U8, 2 ** 60)])),
         action="text", expect=("tokenizer.ggml.tokens",)),
    Balloon("array_2p60_elements_cli_info", data(gguf_file([kv_array("tokenizer.ggml.tokens", U8, 2 ** 60)])),
         action="info", expect=("tokenizer.ggml.tokens",)),
    Balloon("array_10m_elements", lazy(lambda: gguf_file([kv_array("tokenizer.ggml.scores", U8, 10 ** 7,
                                                                bytes(10 ** 7))])),
         expect=("tokenizer.ggml.scores", "MiB")),
    Balloon("tensor_count_2p60_then_zeros", padded(gguf_file(n_tensors=2 ** 60), 64 << 20),
         expect=(f"declares {2 ** 60} tensors",)),
    Balloon("tensor_count_2p60_then_zeros_cli_info", padded(gguf_file(n_tensors=2 ** 60), 64 << 20), action="info",
         expect=("tensors",)),
    Balloon("kv_count_2p40", data(gguf_file(n_kv=2 ** 40) + b"\0" * 64), expect=("metadata entries",)),
    Balloon("kv_count_over_cap_in_zeros", padded(gguf_file(n_kv=65537), 24 + 13 * 65537), expect=("65536 allowed",)),
    # 1M strings cost gguf-py 1.3 GiB (measured): over the reader budget, though 1M numeric elements pass
    Balloon("string_array_1m_strings", lazy(lambda: gguf_file([kv_array(
        "tokenizer.ggml.tokens", STRING, 10 ** 6, string_array_body(b"t" for _ in range(10 ** 6)))])),
         action="validate", expect=("tokenizer.ggml.tokens", "MiB")),
]

# ---- malformed metadata ----

METADATA = [
    Case("string_length_2p62", data(gguf_file([kv("general.name", STRING, struct.pack("<Q", 2 ** 62) + b"abc")])),
         expect=("general.name",)),
    Case("key_length_2p40", data(gguf_file([struct.pack("<Q", 2 ** 40) + b"general.name"]) + b"\0" * 32),
         expect=("metadata key 0",)),
    Case("key_not_utf8", data(gguf_file([kv(b"\xff\xfe", U8, b"\0")])), expect=("UTF-8",)),
    Case("duplicate_key", data(gguf_file([ARCH, ARCH])), expect=("general.architecture", "twice")),
    Case("value_type_13", data(gguf_file([kv("general.name", 13, b"\0" * 8)])), expect=("general.name", "13")),
    Case("array_element_type_99", data(gguf_file([kv_array("tokenizer.ggml.tokens", 99, 0)])),
         expect=("tokenizer.ggml.tokens", "99")),
    Case("nested_arrays_too_deep", data(gguf_file([kv_array("x.nest", ARRAY, 1, array(ARRAY, 1, array(ARRAY, 1, array(
        ARRAY, 1, array(U8, 1, b"\1")))))])), expect=("x.nest", "deep")),
    Case("nested_array_inner_count_2p60", data(gguf_file([kv_array("x.nest", ARRAY, 2, array(U8, 2 ** 60))])),
         expect=("x.nest",)),
    Case("alignment_0", data(one_tensor(kvs=(ARCH, kv_scalar("general.alignment", U32, 0)))),
         expect=("general.alignment", "power of two")),
    Case("alignment_3", data(one_tensor(kvs=(ARCH, kv_scalar("general.alignment", U32, 3)))),
         expect=("general.alignment", "power of two")),
    Case("alignment_string", data(one_tensor(kvs=(ARCH, kv_str("general.alignment", "32")))),
         expect=("general.alignment", "UINT32")),
    Case("alignment_uint64", data(one_tensor(kvs=(ARCH, kv_scalar("general.alignment", U64, 32)))),
         expect=("general.alignment", "UINT32")),
    Case("version_1", data(gguf_file([ARCH], version=1)), expect=("version 1", "obsolete")),
    Case("version_7", data(gguf_file([ARCH], version=7)), expect=("version 7",)),
    Case("big_endian_v3", data(gguf_file([kv_str("general.architecture", "flux", ">")], order=">")),
         expect=("big-endian GGUF is not supported",)),
    Case("not_gguf_magic", data(b"GGUX" + one_tensor()[4:]), action="validate", expect=("not a GGUF file",)),
    Case("shorter_than_header", data(b"GGUF\3\0\0\0"), expect=("too short",)),
]

# ---- malformed tensor infos ----

TENSORS = [
    Case("tensor_0d", data(one_tensor(dims=())), expect=("img_in.weight", "0 dimensions")),
    Case("tensor_9d", data(one_tensor(dims=(1,) * 9)), expect=("img_in.weight", "9 dimensions")),
    Case("tensor_dim_0", data(one_tensor(dims=(8, 0))), expect=("img_in.weight", "dimension 0")),
    Case("tensor_dims_overflow", data(one_tensor(dims=(2 ** 31, 2 ** 31, 2 ** 31))),
         expect=("img_in.weight", "absurd")),
    Case("tensor_dim_2p64_minus_1", data(one_tensor(dims=(2 ** 64 - 1,))), expect=("img_in.weight",)),
    Case("tensor_ne0_not_whole_blocks", data(one_tensor(dims=(33, 2), ggml_type=Q8_0_TYPE, data_bytes=128)),
         expect=("img_in.weight", "Q8_0", "32")),
    Case("tensor_unknown_type", data(one_tensor(ggml_type=9999)), expect=("img_in.weight", "quant type 9999")),
    Case("tensor_removed_type_4", data(one_tensor(ggml_type=4)), expect=("img_in.weight", "quant type 4")),
    Case("tensor_misaligned_offset", data(one_tensor(offset=4, data_bytes=96)),
         expect=("img_in.weight", "alignment")),
    Case("tensor_past_eof", data(one_tensor(dims=(1 << 20,))), expect=("img_in.weight", "truncated")),
    Case("tensor_offset_2p63", data(one_tensor(offset=2 ** 63)), expect=("img_in.weight",)),
    Case("tensor_name_too_long", data(one_tensor(name="x" * (64 * 1024 + 1))), expect=("tensor 0's name",)),
    Case("tensor_name_not_utf8", data(gguf_file([ARCH], [gstr(b"\xc3") + tensor_info("a", [8])[9:]],
                                                data=b"\0" * 32)), expect=("UTF-8",)),
    Case("tensors_duplicate_name", data(f32_tensors(("a.weight", [8], 0), ("a.weight", [8], 32))),
         expect=("a.weight", "twice")),
    Case("tensors_overlap", data(f32_tensors(("a.weight", [32], 0), ("b.weight", [32], 64))),
         expect=("a.weight", "b.weight", "overlap")),
    Case("tensors_aliased", data(f32_tensors(("a.weight", [8], 0), ("b.weight", [8], 0))),
         expect=("a.weight", "b.weight", "same bytes")),
    Case("tensor_inside_a_bigger_one", data(f32_tensors(("big", [64], 0), ("x", [8], 96), ("small", [8], 32))),
         expect=("big", "small", "overlap")),
]


# ---- truncation at every region of a small valid file ----

def small_valid():
    """A valid file and where its regions end. Long keys and strings leave the cut-off files enough bytes for the
    declared counts, so each truncation is found inside its own region."""
    kvs = [kv_str("general.k" + "k" * 400, "v" * 600),
           kv_array("tokenizer.ggml.tokens", STRING, 3, string_array_body(["a" * 300, "b" * 300, "c" * 300])), ARCH]
    body = f32_tensor_file([("a.weight", [8, 2]), ("b.weight", [8])], kvs)
    ends = {"header": 24, "first_key": 24 + 8 + 409, "kv0": 24 + len(kvs[0]), "kv1": 24 + len(kvs[0]) + len(kvs[1])}
    ends["tensor_infos"] = (24 + sum(map(len, kvs)) + len(tensor_info("a.weight", [8, 2]))
                            + len(tensor_info("b.weight", [8])))
    return body, ends


SMALL, ENDS = small_valid()
TRUNCATED = [
    Case("truncated_in_header", data(SMALL[:ENDS["header"] - 4]), expect=("too short",)),
    Case("truncated_below_declared_counts", data(SMALL[:ENDS["header"] + 10]), expect=("hold at most", "truncated")),
    Case("truncated_in_first_key", data(SMALL[:ENDS["first_key"] - 200]), expect=("metadata entry 0", "truncated")),
    Case("truncated_in_first_value", data(SMALL[:ENDS["kv0"] - 200]), expect=("general.kkkk", "truncated")),
    Case("truncated_in_string_array", data(SMALL[:ENDS["kv1"] - 100]), expect=("tokenizer.ggml.tokens", "truncated")),
    Case("truncated_in_tensor_infos", data(SMALL[:ENDS["tensor_infos"] - 5]), expect=("b.weight", "truncated")),
    Case("truncated_before_data", data(SMALL[:ENDS["tensor_infos"]]), expect=("a.weight", "truncated")),
    Case("truncated_in_data", data(SMALL[:-1]), expect=("b.weight", "truncated")),
]


# ---- files as writers make them: valid ones must load with the right values, damaged ones must not ----

def write_tiny_flux_gguf(path, cfg=TINY_FLUX):
    """Q8_0 block linears, F32 rest, written by gguf's GGUFWriter (loaders.writers.write_gguf)."""
    sd = convert_state_dict(random_flux_state_dict(cfg, seed=0, dtype=torch.float32), "q8_0", {})
    write_gguf(path, sd)
    return {"tensors": len(sd), "q8_0": sum(isinstance(v, QTensor) for v in sd.values()), "kvs": 3}


def write_soak_gguf(path):
    """4.4M parameters (a 5 MB file, 18 MB dequantized): a leak of one file mapping or one dequantized copy per
    round would add 250 MB over the soak, far above its 50 MB bound."""
    return write_tiny_flux_gguf(path, FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1,
                                                 context_in_dim=256, vec_in_dim=256))


def truncated_flux(cut):
    def build(path):
        write_tiny_flux_gguf(path)
        content = path.read_bytes()
        path.write_bytes(content[:cut(len(content))])
    return build


def write_tiny_t5_gguf(path):
    from t5_files import TINY_T5, write_llamacpp_t5

    from fixtures.text_encoders import random_state_dict
    from kontext_lowvram.loaders.text_encoders import t5_tensor_shapes
    write_llamacpp_t5(path, random_state_dict(t5_tensor_shapes(TINY_T5), seed=1))


def tokenizer_like(n_tokens, n_merges, scores, n_tensors=800):
    """A real-size LLM-style header: n_tensors small tensors, a tokenizer's token strings, merges, token types
    (and scores): what an LLM / text-encoder GGUF carries."""
    def build(path):
        kvs = [kv_str("general.architecture", "llama"),
               kv_array("tokenizer.ggml.tokens", STRING, n_tokens, string_array_body(
                   b"<tok%06d>" % i for i in range(n_tokens))),
               kv_array("tokenizer.ggml.token_type", I32, n_tokens, struct.pack(f"<{n_tokens}i", *[1] * n_tokens))]
        if n_merges:
            kvs.append(kv_array("tokenizer.ggml.merges", STRING, n_merges, string_array_body(
                b"a%d b%d" % (i, i) for i in range(n_merges))))
        if scores:
            kvs.append(kv_array("tokenizer.ggml.scores", F32, n_tokens, bytes(4 * n_tokens)))
        path.write_bytes(f32_tensor_file([(f"blk.{i // 8}.t{i % 8}.weight", [8]) for i in range(n_tensors)], kvs))
        return {"tensors": n_tensors, "elements": n_tokens * (3 if scores else 2) + n_merges}
    return build


def check_flux_loaded(v, e):
    assert v["tensors"] == e["tensors"] and v["tensor_types"]["Q8_0"] == e["q8_0"] and v["hidden_size"] == 64, (v, e)


def check_header(v, e):
    assert v["tensor_count"] == e["tensors"] and v["array_elements"] == e["elements"], (v, e)


def check_small_valid(v, e):
    assert (v["version"], v["tensor_count"], v["kv_count"], v["array_elements"]) == (3, 2, 3, 3), v
    assert v["alignment"] == 32 and v["data_offset"] == ENDS["tensor_infos"] + (-ENDS["tensor_infos"] % 32), v


REAL_FILES = [
    Case("valid_tiny_flux_q8_0_loads", write_tiny_flux_gguf, check=check_flux_loaded),
    Case("valid_tiny_flux_q8_0_cli_info", write_tiny_flux_gguf, action="info",
         check=lambda v, e: v["rc"] == 0 and f"tensors: {e['tensors']}, {e['q8_0']} of them quantized" in v["stdout"]),
    Case("valid_tiny_flux_header", write_tiny_flux_gguf, action="validate",
         check=lambda v, e: (v["tensor_count"], v["kv_count"]) == (e["tensors"], e["kvs"])),
    Case("valid_t5_gguf_text_encoder", write_tiny_t5_gguf, action="text", check=lambda v, e: v["kind"] == "t5"),
    Case("valid_small_handmade_header", data(SMALL), action="validate", check=check_small_valid),
    Case("valid_small_handmade_reader", data(SMALL), action="reader",
         check=lambda v, e: v["tensors"] == 2 and "tokenizer.ggml.tokens" in v["fields"]),
    Case("valid_alignment_64", data(one_tensor(kvs=(ARCH, kv_scalar("general.alignment", U32, 64)), alignment=64)),
         action="validate", check=lambda v, e: v["alignment"] == 64 and v["data_offset"] % 64 == 0),
    Case("valid_nested_array_depth_2", data(gguf_file([kv_array("x.nest", ARRAY, 2, array(U8, 2, b"\1\2") * 2)])),
         action="reader", check=lambda v, e: "x.nest" in v["fields"]),
    Case("valid_gemma3_size_tokenizer_800_tensors", tokenizer_like(262_208, 0, scores=True), action="validate",
         check=check_header),
    Case("valid_llama3_size_tokenizer_with_merges", tokenizer_like(128_256, 280_147, scores=False),
         action="validate", check=check_header),
    Case("valid_1m_numeric_elements", lazy(lambda: gguf_file([kv_array("x.values", U8, 10 ** 6,
                                                                       bytes(10 ** 6))])),
         action="validate", check=lambda v, e: v["array_elements"] == 10 ** 6),
    Case("truncated_flux_mid_data", truncated_flux(lambda n: n // 2), expect=("truncated",)),
    Case("truncated_flux_last_byte", truncated_flux(lambda n: n - 1), expect=("truncated",)),
    Case("no_gguf_package", write_tiny_flux_gguf, action="without_gguf",
         expect=("needs the 'gguf' Python package", "pip install gguf")),
]


# ---- safetensors headers ----

def st_file(header, data_bytes=8, raw_header=None):
    """A safetensors file: `header` as JSON (or `raw_header()` bytes, made when written), then zeroed data."""
    def build(path):
        raw = raw_header() if raw_header is not None else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return build


def f32(offsets=(0, 8), shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write_tiny_flux_safetensors(path):
    from safetensors.torch import save_file
    sd = random_flux_state_dict(TINY_FLUX, seed=0, dtype=torch.bfloat16)
    save_file(sd, str(path), metadata={"format": "pt"})
    return {"tensors": len(sd)}


def write_scaled_fp8_safetensors(path):
    """Scaled fp8 as ComfyUI writes it, with the zero-size `scaled_fp8` marker tensor."""
    write_safetensors(path, convert_state_dict(random_flux_state_dict(TINY_FLUX, seed=0), "fp8_e4m3fn_scaled", {}))


ST = ".safetensors"
SAFETENSORS = [
    Case("st_string_offsets", st_file({"w": f32(offsets=("0", "8"))}), "st_header", ("'w'", "data_offsets"),
         suffix=ST),
    Case("st_string_offsets_load", st_file({"w": f32(offsets=("0", "8"))}), "load", ("'w'", "data_offsets"),
         suffix=ST),
    Case("st_float_offsets", st_file({"w": f32(offsets=(0.0, 8.0))}), "st_header", ("'w'", "data_offsets"),
         suffix=ST),
    Case("st_three_offsets", st_file({"w": f32(offsets=(0, 8, 8))}), "st_header", ("'w'", "data_offsets"),
         suffix=ST),
    Case("st_negative_offset", st_file({"w": f32(offsets=(-8, 0))}), "st_header", ("'w'", "data_offsets"),
         suffix=ST),
    Case("st_negative_shape", st_file({"w": f32(shape=(-2,))}), "st_header", ("'w'", "shape"), suffix=ST),
    Case("st_bool_shape", st_file({"w": f32(shape=(True, 2))}), "st_header", ("'w'", "shape"), suffix=ST),
    Case("st_float_shape", st_file({"w": f32(shape=(2.0,))}), "st_header", ("'w'", "shape"), suffix=ST),
    Case("st_string_shape", st_file({"w": {**f32(), "shape": "2"}}), "st_header", ("'w'", "shape"), suffix=ST),
    Case("st_entry_not_object", st_file({"w": [0, 8]}), "st_header", ("'w'", "not an object"), suffix=ST),
    Case("st_entry_missing_dtype", st_file({"w": {"shape": [2], "data_offsets": [0, 8]}}), "st_header",
         ("'w'", "dtype"), suffix=ST),
    Case("st_metadata_not_object", st_file({"__metadata__": ["format", "pt"], "w": f32()}), "st_header",
         ("__metadata__",), suffix=ST),
    Case("st_metadata_int_value", st_file({"__metadata__": {"format": 1}, "w": f32()}), "st_header",
         ("__metadata__", "'format'"), suffix=ST),
    Case("st_size_mismatch", st_file({"w": f32(offsets=(0, 4))}), "st_header", ("'w'", "needs 8 bytes"), suffix=ST),
    Case("st_overlap", st_file({"a": f32(offsets=(0, 8)), "b": f32(offsets=(4, 12))}, data_bytes=12), "st_header",
         ("'a'", "'b'", "overlap"), suffix=ST),
    Case("st_aliased", st_file({"a": f32(), "b": f32()}), "st_header", ("'a'", "'b'", "overlap"), suffix=ST),
    Case("st_unknown_dtype", st_file({"w": f32(dtype="Q4_0")}), "st_header", ("'w'", "Q4_0"), suffix=ST),
    Case("st_f4_half_byte", st_file({"w": f32(offsets=(0, 2), shape=(3,), dtype="F4")}), "st_header",
         ("'w'", "whole number of bytes"), suffix=ST),
    Case("st_past_data_end", st_file({"w": f32(offsets=(0, 16), shape=(4,))}), "st_header", ("'w'", "ends at byte"),
         suffix=ST),
    Case("st_huge_shape", st_file({"w": f32(shape=(10 ** 4000,) * 50)}), "st_header", ("'w'", "needs"), suffix=ST),
    Case("st_header_length_past_eof", data(struct.pack("<Q", 1 << 40) + b'{"w":{}}'), "st_header",
         ("header length",), suffix=ST),
    Case("st_deeply_nested_json", st_file(None, raw_header=lambda: b'{"w":' + b"[" * 200_000 + b"]" * 200_000
                                          + b"}"), "st_header", ("corrupt safetensors header",), suffix=ST),
    # json.loads would build 1.15 GB of empty lists from these 48 MiB
    Case("st_json_48mib_of_empty_lists", st_file(None, raw_header=lambda: b'{"w":[' + b"[]," * (16 << 20)
                                                 + b"[]]}"),
         "st_header", ("corrupt safetensors header", "JSON values"), suffix=ST),
    Case("st_valid_f4", st_file({"w": f32(offsets=(0, 2), shape=(4,), dtype="F4")}, data_bytes=2), "st_header",
         check=lambda v, e: v["tensors"] == ["w"], suffix=ST),
    Case("st_valid_tiny_flux_bf16", write_tiny_flux_safetensors,
         check=lambda v, e: v["tensors"] == e["tensors"] and v["hidden_size"] == 64, suffix=ST),
    Case("st_valid_scaled_fp8_with_empty_marker", write_scaled_fp8_safetensors,
         check=lambda v, e: v["format"] == "fp8 (scaled)" and v["hidden_size"] == 64, suffix=ST),
]

# ---- measurements: the validator's memory model against gguf-py; RSS over repeated loads ----

MEASURED = [
    # the budget is only as good as this estimate: it must not be optimistic (nor wildly pessimistic)
    Case("reader_cost_estimate_matches_gguf_py", tokenizer_like(40_000, 40_000, scores=True, n_tensors=2000),
         action="reader_cost", time_cap=60,
         check=lambda v, e: 0.5 * v["estimate"] <= v["growth"] <= 1.25 * v["estimate"]),
    Case("soak_load_dequantize_50x", write_soak_gguf, action="soak", time_cap=120,
         check=lambda v, e: max(v["rss"][5:]) - v["rss"][4] < 50 << 20),
]

CASES = BALLOONS + METADATA + TENSORS + TRUNCATED + REAL_FILES + SAFETENSORS + MEASURED
assert len({c.id for c in CASES}) == len(CASES)
