"""``scratchlm serve``: the argparse side only; the server (the [serve] extra) loads when the command runs."""
from __future__ import annotations


def register(subparsers) -> None:
    from scratchlm.serve import add_serve_arguments, cmd_serve       # argparse only; the server loads on use
    p = subparsers.add_parser("serve", help="serve a run over HTTP: an OpenAI-compatible API and a web page",
                               description="Serve a run folder's model: POST /v1/completions and "
                                           "/v1/chat/completions (OpenAI's shapes, streaming), a web page at /.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
