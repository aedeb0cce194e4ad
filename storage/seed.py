"""The demo school: one tenant, one course, a student and a teacher."""

from __future__ import annotations

from dataclasses import dataclass

from .postgres import Database

DEMO_TENANT = "demo"
DEMO_COURSE = "algebra-1"
DEMO_STUDENT = "demo-student"
DEMO_TEACHER = "demo-teacher"


@dataclass(frozen=True)
class DemoSeed:
    tenant: str = DEMO_TENANT
    course: str = DEMO_COURSE
    student: str = DEMO_STUDENT
    teacher: str = DEMO_TEACHER


async def seed_demo(db: Database) -> DemoSeed:
    """Create (or refresh) the demo tenant, course and users; safe to run again."""
    await db.upsert_course(
        DEMO_TENANT,
        DEMO_COURSE,
        "Algebra I",
        "Linear equations, inequalities, functions and their graphs, systems of equations, and an "
        "introduction to quadratics. Students learn to model word problems with equations.",
    )
    await db.upsert_user(DEMO_TENANT, DEMO_STUDENT, "student", "Demo Student")
    await db.upsert_user(DEMO_TENANT, DEMO_TEACHER, "teacher", "Demo Teacher")
    return DemoSeed()
