"""Shared by the text-encoder unit and integration tests: a tiny T5 config and a T5 GGUF written as llama.cpp's
converter writes one (city96's T5 files), named by gguf-py's own tensor map, so our reader is checked against an
independent naming and gguf-py's own quantizer/dequantizer."""
import gguf
import torch

TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2}


def llamacpp_names(n_blocks):
    """HF T5 name -> llama.cpp name, from gguf-py's own tensor map (how city96's files were converted)."""
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_blocks)
    return lambda hf: m.get_name(hf, try_suffixes=(".weight", ".bias"))


def write_llamacpp_t5(path, sd, qtype=gguf.GGMLQuantizationType.Q8_0, extra=None):
    """A T5 GGUF as llama.cpp writes one: arch t5encoder, llama.cpp names, 2-D weights quantized, rest F32.
    `extra` tensors are written under their own names. Returns the values the file holds (dequantized by gguf-py),
    in HF naming."""
    name = llamacpp_names(TINY_T5["num_layers"])
    w = gguf.GGUFWriter(str(path), arch="t5encoder")
    ref = {}
    for k, v in {**sd, **(extra or {})}.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name(k) if k in sd else k, q, raw_dtype=qtype)
            ref[k] = torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(a.shape))
        else:
            w.add_tensor(name(k) if k in sd else k, a)
            ref[k] = torch.from_numpy(a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref
