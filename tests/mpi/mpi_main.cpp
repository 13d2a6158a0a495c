// The Catch2 main of the MPI tests: MPI_Init before Catch's session and
// MPI_Finalize after it (lora::dist::MpiSession), and one world communicator
// for the test cases. Its own TU, as tests/catch_main.cpp, so Catch's
// implementation is not recompiled with the tests.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <lora/dist/mpi.hpp>

namespace {
lora::dist::MpiCommunicator* world_ptr = nullptr;
}

lora::dist::MpiCommunicator& lora_test_world() { return *world_ptr; }

int main(int argc, char** argv) {
  lora::dist::MpiSession mpi(argc, argv);
  int result = 0;
  {
    lora::dist::MpiCommunicator world;
    world_ptr = &world;
    result = Catch::Session().run(argc, argv);
    world_ptr = nullptr;
  }
  // Every rank exits with the worst result, so mpirun reports any rank's failure.
  MPI_Allreduce(MPI_IN_PLACE, &result, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return result;
}
