"""`kontext-lowvram convert IN OUT --to TYPE [--force] [--no-verify]`: the command line of loaders/convert.py."""
import argparse
import os
import sys
import time


def _type_arg(text):
    from .loaders.convert_mix import target
    try:
        return target(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _types_epilog():
    from .loaders.convert_mix import TARGETS
    rows = [f"  {t.name:<18} {t.what}" for t in TARGETS.values()]
    return ("types (GGUF unless noted; FLUX and T5-XXL take every type but nf4 is FLUX only):\n" + "\n".join(rows) +
            "\n\nIN: a FLUX.1 or FLUX.2 ([dev], [klein]) transformer (BFL single file, optionally "
            "model.diffusion_model.-prefixed;\na diffusers folder or its *.safetensors.index.json; an unquantized "
            "GGUF) or a T5 encoder (bf16/fp16/fp32/fp8\nsafetensors). OUT may be a folder: the file is then named "
            "<model>-<TYPE>.gguf / .safetensors.")


def add_convert_parser(sub):
    c = sub.add_parser("convert", help="convert a FLUX.1 / FLUX.2 transformer or T5 encoder to GGUF (Q8_0 ... "
                                       "Q2_K), ComfyUI scaled fp8 or NF4, tensor by tensor",
                       description="Convert a model file tensor by tensor (peak RAM a few times the largest tensor), "
                                   "verify the result against the source and write a .sha256 next to it.",
                       epilog=_types_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", metavar="IN", help="the model to convert (file, diffusers folder or index json)")
    c.add_argument("dst", metavar="OUT", help="the file to write (.gguf for GGUF types, .safetensors for "
                                              "fp8_e4m3fn_scaled / nf4), or a folder")
    c.add_argument("--to", required=True, type=_type_arg, metavar="TYPE", help="the target type (see below)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-verify", action="store_true",
                   help="skip reading OUT back and comparing every tensor with the source")
    c.set_defaults(fn=run)
    return c


class _Bar:
    """tqdm per phase (tensors done / total, MB/s of source read) where tqdm is installed, else a line per phase."""

    def __init__(self):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.tqdm, self.bar, self.phase, self.t0 = tqdm, None, None, 0.0

    def __call__(self, done, total, nbytes, phase):
        if phase != self.phase:
            self.close()
            self.phase, self.t0 = phase, time.perf_counter()
            if self.tqdm is not None:
                self.bar = self.tqdm(total=total, unit="tensor", desc=phase, file=sys.stderr, leave=False)
            else:
                print(f"{phase}: {total} tensors ...", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"{nbytes / 2**20 / max(time.perf_counter() - self.t0, 1e-9):,.0f} MB/s",
                                     refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args):
    from .loaders import ModelFileError
    from .loaders.convert import ConvertError, convert, default_output_name
    dst = args.dst
    if os.path.isdir(dst):
        dst = os.path.join(dst, default_output_name(args.src, args.to))
    bar = _Bar()
    try:
        report = convert(args.src, dst, args.to, force=args.force, verify=not args.no_verify, progress=bar)
    except (ModelFileError, ConvertError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    bar.close()
    print(report.summary())
    return 0
