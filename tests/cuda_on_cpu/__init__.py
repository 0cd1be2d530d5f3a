"""CUDA C++ kernels on the CPU: the header, the launch runtime and the Python harness that run
``kernels/*.cu`` unchanged under g++ (plain, AddressSanitizer + UBSan, ThreadSanitizer)."""
