# Writes OUT, a header that defines NIBBLE_GIT_COMMIT as the short commit of the source tree SRC
# ("+dirty" when tracked files differ from it; "unknown" without git). Run at every build by the
# nibble_git_commit target (CMakeLists.txt), so a benchmark's JSON names the commit it was built
# from, not the one CMake configured at. The file is rewritten only when its text changes, so
# an unchanged commit recompiles nothing.
#   cmake -DSRC=<source dir> -DOUT=<header> -P write_git_commit.cmake
execute_process(COMMAND git rev-parse --short=12 HEAD WORKING_DIRECTORY "${SRC}"
                OUTPUT_VARIABLE commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  set(commit unknown)
else()
  execute_process(COMMAND git status --porcelain --untracked-files=no WORKING_DIRECTORY "${SRC}"
                  OUTPUT_VARIABLE changes OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT changes STREQUAL "")
    set(commit "${commit}+dirty")
  endif()
endif()
set(text "// Generated at build time by cmake/write_git_commit.cmake; do not edit.\n#define NIBBLE_GIT_COMMIT \"${commit}\"\n")
set(old "")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
endif()
if(NOT old STREQUAL text)
  file(WRITE "${OUT}" "${text}")
endif()
