"""The `qwen3` command's entry point, outside the package so that nothing heavy is imported before it runs.

`import qwen3` imports torch (a second or two); a Ctrl-C in that window would otherwise end in a traceback from
deep inside torch's import. Here it is one quiet exit with status 130, as everywhere else in the CLI.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from qwen3.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
