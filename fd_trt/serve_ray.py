"""``python -m fd_trt.serve_ray``: kept as the command's name; the code is [`fd_trt.serving.ray`][fd_trt.serving.ray]."""

from fd_trt.serving.ray import deployment, main

__all__ = ["deployment", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
