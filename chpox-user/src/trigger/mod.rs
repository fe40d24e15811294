//! The trigger path, apart from the engine: the eBPF program's loader and
//! maps (`bpf`), the agent that turns a trigger signal, a timer or a
//! request into a checkpoint (`agent`), and the control protocol clients
//! use to talk to it (`control`). The engine (`dump`, `restore`) knows
//! nothing of them.

pub mod agent;
pub mod bpf;
pub mod control;
