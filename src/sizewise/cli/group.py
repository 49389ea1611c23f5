"""The `sizewise` command group; commands register on it from their modules."""

from __future__ import annotations

import click


class _Commands(click.Group):
    """`pack` and `unpack` (sizewise.lossless.cli) load when named: importing the lossless package
    loads torch, and `import sizewise.cli` stays light so that `main` handles signals first."""

    LAZY = ("pack", "unpack")

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name):
        if name in self.LAZY:
            from ..lossless import cli as lossless_cli

            return getattr(lossless_cli, name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sizewise")
def cli():
    """Compress a causal language model to the size you choose, and measure what it cost.

    MODEL is a Hugging Face directory (safetensors), a .gguf file, a sizewise artifact
    directory, or a built-in name (smollm2-135m, qwen2.5-coder-0.5b). Typical use:

    \b
      sizewise compress smollm2-135m --method gptq --bits 4 --group-size 64 \\
          --calib enwiki-sample -o out/w4g64
      sizewise eval out/w4g64 --text wikitext2-test --windows 64 --against smollm2-135m
      sizewise info out/w4g64
    """
