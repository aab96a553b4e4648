"""Names the pipeline gives its stages, on the ground floor: the modules that
build, check, plan or export the stages all read them, and `optima.config` (which
registers the stages' configurables) sits above those modules."""

#: The gin scope (and stage name) of the teacher; students may not take it.
TEACHER = "teacher"
