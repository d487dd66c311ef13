"""ivl-kit's shared package. Importing it (every entry point does, through `finetune` / `distill` too) installs one
log filter, below."""

import logging


class _NoKernelHubNotice(logging.Filter):
    """bitsandbytes >= 0.49 on CPUs with AVX512-BF16 tries to download a 4-bit GEMM kernel from the Hugging Face hub
    (`kernels` package) at import and logs a warning when it can't, then falls back to its own CPU kernel, which is
    what the kit uses. The warning would open every command's output; nothing else from bitsandbytes is hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


# getLogger creates the logger before bitsandbytes does, so the filter is in place when bitsandbytes is imported.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())
