"""Command-line tools (installed as ``glag.tools``): thin argparse front ends over glag."""
