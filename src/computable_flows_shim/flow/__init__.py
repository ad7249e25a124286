"""The flow runtime: primitives (F_Dis, F_Proj, F_Multi), operators, flow specs,
certificates, the telemetry recorder and the engine (run_flow, resume_flow) that checkpoints
through the checkpoints layer."""
