"""The program-transformation layer: the sample primitive, the shared interpreter, the
generative-function interface (simulate/assess/generate) and ADEV. Imports nothing from `ppl`."""
