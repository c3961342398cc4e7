"""AUTOMATIC1111's vocabulary in one place: its API bodies, option keys, names and infotext, translated to and
from our native request payloads and result records. Pure functions: no HTTP framework, no engine calls."""
