"""Measuring alignment: prefix curves, entropy, judged generations, judges."""
